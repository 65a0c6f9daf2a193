//! Calibration from images: a directory of `.png` / `.jpg` files (or one image file) feeding a
//! single-input model whose input is an image batch, `[N, C, H, W]` or `[N, H, W, C]`.
//!
//! Each file becomes one sample, in file-name order (byte order of the path, so the result does
//! not depend on the directory listing). For every image:
//!
//! 1. **Decode** (PNG or JPEG, detected from the content). 8-bit images give values in
//!    `0..=255` exactly; 16-bit PNGs are mapped onto the same `0..=255` range (`v * 255/65535`).
//! 2. **Channels.** A model with `C = 3` gets RGB (an alpha channel is dropped, not composited;
//!    gray images are repeated on the three channels). A model with `C = 1` gets luma: gray
//!    images as they are, colour images as `0.299 R + 0.587 G + 0.114 B` (ITU-R BT.601, the
//!    weights of PIL's `convert("L")` and torchvision's `Grayscale`), not rounded.
//! 3. **Resize** to `H × W`: `--resize WxH` if given, else the model input's fixed `H` and `W`
//!    (a symbolic `H` or `W` keeps the image's own size; then every image must share it).
//!    The filter is a separable triangle (linear) filter on pixel centres, as PIL's
//!    `Image.resize(..., BILINEAR)`: plain bilinear interpolation with half-pixel centres when
//!    enlarging, a triangle widened to the scale factor (antialiased) when shrinking, weights
//!    renormalised at the borders (edge pixels are effectively repeated). Computed in f32 on
//!    the `0..=255` values, no rounding to 8 bits; an image already at the target size is not
//!    touched. Aspect ratio is not kept (no crop): resize or crop beforehand if that matters.
//! 4. **Normalise**: `value = (pixel * scale - mean[c]) / std[c]`, with `scale` 1/255 by
//!    default, so `--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225` gives the usual ImageNet
//!    preprocessing. `mean` and `std` hold one value (every channel) or one per channel.
//! 5. **Layout**: `--layout nchw|nhwc`; without it the layout is inferred from the model input:
//!    NCHW when dimension 1 is 1 or 3, else NHWC when dimension 3 is 1 or 3, else an error
//!    asking for `--layout`. (`[N, 3, 3, 3]`-like shapes are read as NCHW, the default.)
//!
//! Errors name the file (unreadable or corrupt image, images of different sizes without a
//! resize), and the model input (several inputs, not rank 4, channel count neither 1 nor 3).

use super::inputs::{InputDim, InputSpec};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where the channel dimension sits in an image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[N, C, H, W]` (PyTorch, ONNX convention).
    Nchw,
    /// `[N, H, W, C]` (TensorFlow, Keras).
    Nhwc,
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            _ => Err(format!("'{s}' is not a layout: expected nchw or nhwc")),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        })
    }
}

/// How images become input tensors (ignored for `.npy` / `.npz` data).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    /// Resize every image to exactly `(width, height)`; default: the model input's fixed H, W.
    pub resize: Option<(usize, usize)>,
    /// Channel layout of the model input; default: inferred from its shape.
    pub layout: Option<Layout>,
    /// Multiplies the `0..=255` pixel values first (default 1/255; f64 so that the default
    /// gives `pixel / 255` correctly rounded to f32, as numpy's `x / 255` does).
    pub scale: f64,
    /// Subtracted after scaling: one value for every channel, or one per channel.
    pub mean: Vec<f32>,
    /// Divides after the mean: one value for every channel, or one per channel.
    pub std: Vec<f32>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            resize: None,
            layout: None,
            scale: 1.0 / 255.0,
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

/// Parse `1/255`, `0.00392`, `1`.
pub fn parse_scale(s: &str) -> std::result::Result<f64, String> {
    let num = |t: &str| {
        t.trim().parse::<f64>().map_err(|_| {
            format!("'{s}' is not a scale: expected a number or a fraction like 1/255")
        })
    };
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if b == 0.0 {
                return Err(format!("'{s}': division by zero"));
            }
            a / b
        }
        None => num(s)?,
    };
    if !v.is_finite() || v == 0.0 {
        return Err(format!("'{s}': the scale must be finite and non-zero"));
    }
    Ok(v)
}

/// Parse `224x224` (width x height).
pub fn parse_resize(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("'{s}' is not a size: expected WxH like 224x224");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 {
        return Err(format!("'{s}': width and height must be positive"));
    }
    Ok((w, h))
}

/// Parse `0.485,0.456,0.406` (or one value).
pub fn parse_channels(s: &str) -> std::result::Result<Vec<f32>, String> {
    let v = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    format!("'{s}': '{t}' is not a number (expected e.g. 0.485,0.456,0.406)")
                })
        })
        .collect::<std::result::Result<Vec<f32>, String>>()?;
    if v.len() != 1 && v.len() != 3 {
        return Err(format!("'{s}': expected 1 or 3 values, got {}", v.len()));
    }
    Ok(v)
}

/// Image file extensions read (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];
/// Image extensions recognised but not read (the `image` crate is built with png and jpeg only).
pub const UNSUPPORTED_IMAGE_EXTENSIONS: &[&str] = &["bmp", "gif", "webp", "tif", "tiff"];

/// The lower-cased extension of a path ("" when none).
pub fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// What the images must become for one model input.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTarget {
    pub layout: Layout,
    /// 1 (luma) or 3 (RGB).
    pub channels: usize,
    /// Target height and width; `None` keeps the image's own.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub scale: f64,
}

/// Check that `spec` can take images and work out the layout, channels and size.
pub fn target(spec: &InputSpec, opts: &ImageOptions) -> Result<ImageTarget> {
    let what = spec.describe();
    ensure!(
        spec.dims.len() == 4,
        "model input {what} has rank {}; images feed rank-4 inputs ([N, C, H, W] or [N, H, W, C])",
        spec.dims.len()
    );
    let fixed = |i: usize| match spec.dims[i] {
        InputDim::Fixed(v) => Some(v),
        InputDim::Symbolic(_) => None,
    };
    let is_channel = |i: usize| matches!(fixed(i), Some(1 | 3));
    let layout = match opts.layout {
        Some(l) => l,
        None if is_channel(1) => Layout::Nchw,
        None if is_channel(3) => Layout::Nhwc,
        None => bail!(
            "model input {what}: cannot tell the channel dimension (neither dimension 1 nor 3 is 1 or 3); images give 1 (grayscale) or 3 (RGB) channels: pass --layout nchw or nhwc if this input takes images"
        ),
    };
    let (c_axis, h_axis, w_axis) = match layout {
        Layout::Nchw => (1, 2, 3),
        Layout::Nhwc => (3, 1, 2),
    };
    let channels = match fixed(c_axis) {
        Some(c @ (1 | 3)) => c,
        Some(c) => bail!(
            "model input {what} has {c} channels in layout {layout} (dimension {c_axis}); images give 1 (grayscale) or 3 (RGB)"
        ),
        None => bail!(
            "model input {what} has a symbolic channel dimension ({c_axis}) in layout {layout}; images need it fixed at 1 or 3"
        ),
    };
    let (height, width) = match opts.resize {
        Some((w, h)) => {
            for (axis, want, name) in [(h_axis, h, "height"), (w_axis, w, "width")] {
                if let Some(m) = fixed(axis) {
                    ensure!(
                        m == want,
                        "--resize {w}x{h} gives {name} {want} but model input {what} fixes {name} {m} (dimension {axis})"
                    );
                }
            }
            (Some(h), Some(w))
        }
        None => (fixed(h_axis), fixed(w_axis)),
    };
    for (name, v) in [("--mean", &opts.mean), ("--std", &opts.std)] {
        ensure!(
            v.len() == 1 || v.len() == channels,
            "{name} has {} values but model input {what} takes {channels} channel(s){}",
            v.len(),
            if channels == 1 {
                " (grayscale): give one value"
            } else {
                ""
            }
        );
    }
    ensure!(
        opts.std.iter().all(|s| *s != 0.0 && s.is_finite()),
        "--std {:?}: every value must be finite and non-zero",
        opts.std
    );
    ensure!(
        opts.mean.iter().all(|m| m.is_finite()),
        "--mean {:?}: every value must be finite",
        opts.mean
    );
    ensure!(
        opts.scale.is_finite() && opts.scale != 0.0,
        "--scale {}: must be finite and non-zero",
        opts.scale
    );
    Ok(ImageTarget {
        layout,
        channels,
        height,
        width,
        mean: opts.mean.clone(),
        std: opts.std.clone(),
        scale: opts.scale,
    })
}

/// A decoded image as planes of f32 in `0..=255`: `planes[c][y * width + x]`.
#[derive(Debug, Clone)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub planes: Vec<Vec<f32>>,
}

/// Decode `path` into `channels` (1 = luma, 3 = RGB) planes of `0..=255` values.
pub fn decode(path: &Path, channels: usize) -> Result<Planes> {
    let img = ::image::ImageReader::open(path)
        .with_context(|| format!("cannot open image '{}'", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image '{}'", path.display()))?
        .decode()
        .with_context(|| format!("image '{}' is unreadable or corrupt", path.display()))?;
    let color = img.color();
    let eight_bit = color.bytes_per_pixel() == color.channel_count();
    let (width, height) = (img.width() as usize, img.height() as usize);
    ensure!(
        width > 0 && height > 0,
        "image '{}' is empty ({width}x{height})",
        path.display()
    );
    let n = width * height;
    // Interleaved values in 0..=255, `k` channels per pixel.
    let gather = |k: usize, data: Vec<f32>| -> Vec<Vec<f32>> {
        (0..k)
            .map(|c| (0..n).map(|i| data[i * k + c]).collect())
            .collect()
    };
    let rgb = |img: &::image::DynamicImage| -> Vec<Vec<f32>> {
        if eight_bit {
            gather(
                3,
                img.to_rgb8()
                    .into_raw()
                    .into_iter()
                    .map(f32::from)
                    .collect(),
            )
        } else {
            gather(
                3,
                img.to_rgb32f()
                    .into_raw()
                    .into_iter()
                    .map(|v| v * 255.0)
                    .collect(),
            )
        }
    };
    let planes = match (channels, color.has_color()) {
        (3, _) => rgb(&img),
        (_, false) => {
            if eight_bit {
                vec![img
                    .to_luma8()
                    .into_raw()
                    .into_iter()
                    .map(f32::from)
                    .collect()]
            } else {
                vec![img
                    .to_luma32f()
                    .into_raw()
                    .into_iter()
                    .map(|v| v * 255.0)
                    .collect()]
            }
        }
        (_, true) => {
            let p = rgb(&img);
            vec![(0..n)
                .map(|i| 0.299 * p[0][i] + 0.587 * p[1][i] + 0.114 * p[2][i])
                .collect()]
        }
    };
    Ok(Planes {
        width,
        height,
        planes,
    })
}

/// For each output index, the first source index and the normalised weights (triangle filter
/// of radius `max(1, in/out)` source pixels around the output pixel's centre).
fn triangle_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f64 / output as f64;
    let support = scale.max(1.0);
    (0..output)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = (centre - support).floor().max(0.0) as usize;
            let hi = ((centre + support).ceil() as usize).min(input);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= sum);
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Resize one plane (`width x height`, row-major) to `new_w x new_h` with the triangle filter
/// (horizontal pass, then vertical).
pub fn resize_plane(
    plane: &[f32],
    width: usize,
    height: usize,
    new_w: usize,
    new_h: usize,
) -> Vec<f32> {
    let wx = triangle_weights(width, new_w);
    let wy = triangle_weights(height, new_h);
    let mut rows = vec![0f32; new_w * height];
    for y in 0..height {
        let src = &plane[y * width..(y + 1) * width];
        for (x, (lo, w)) in wx.iter().enumerate() {
            rows[y * new_w + x] = w.iter().zip(&src[*lo..]).map(|(a, b)| a * b).sum();
        }
    }
    let mut out = vec![0f32; new_w * new_h];
    for (y, (lo, w)) in wy.iter().enumerate() {
        for x in 0..new_w {
            out[y * new_w + x] = w
                .iter()
                .enumerate()
                .map(|(k, a)| a * rows[(lo + k) * new_w + x])
                .sum();
        }
    }
    out
}

/// Decode, resize, normalise one image into a `[1, ...]` tensor in the target's layout.
pub fn load_image(path: &Path, t: &ImageTarget) -> Result<ArrayD<f32>> {
    let mut img = decode(path, t.channels)?;
    let new_h = t.height.unwrap_or(img.height);
    let new_w = t.width.unwrap_or(img.width);
    if (new_w, new_h) != (img.width, img.height) {
        for p in img.planes.iter_mut() {
            *p = resize_plane(p, img.width, img.height, new_w, new_h);
        }
    }
    let pick = |v: &[f32], c: usize| f64::from(if v.len() == 1 { v[0] } else { v[c] });
    let n = new_w * new_h;
    let c = t.channels;
    let mut data = vec![0f32; c * n];
    for (ch, plane) in img.planes.iter().enumerate() {
        let (mean, std, scale) = (pick(&t.mean, ch), pick(&t.std, ch), t.scale);
        for (i, &v) in plane.iter().enumerate() {
            let out = match t.layout {
                Layout::Nchw => ch * n + i,
                Layout::Nhwc => i * c + ch,
            };
            data[out] = ((f64::from(v) * scale - mean) / std) as f32;
        }
    }
    let shape = match t.layout {
        Layout::Nchw => [1, c, new_h, new_w],
        Layout::Nhwc => [1, new_h, new_w, c],
    };
    ArrayD::from_shape_vec(IxDyn(&shape), data)
        .with_context(|| format!("image '{}': building the tensor", path.display()))
}

/// Load `files` (already sorted) for `spec`: one `[1, ...]` tensor per file with its origin.
/// All images must end at the same size (they do whenever H and W are fixed or resized).
pub fn load_images(
    files: &[PathBuf],
    spec: &InputSpec,
    opts: &ImageOptions,
) -> Result<Vec<(ArrayD<f32>, String)>> {
    let t = target(spec, opts)?;
    // Decode in parallel; results come back in file order, and the first failing file (in that
    // order) is the one reported, so errors are deterministic too.
    let loaded: Vec<Result<ArrayD<f32>>> = files.par_iter().map(|p| load_image(p, &t)).collect();
    let mut out: Vec<(ArrayD<f32>, String)> = Vec::with_capacity(files.len());
    for (p, a) in files.iter().zip(loaded) {
        let a = a?;
        if let Some((first, origin)) = out.first() {
            ensure!(
                first.shape() == a.shape(),
                "image '{}' gives shape {:?} but {origin} gives {:?}: the model input {} does not fix the image size, so pass --resize WxH",
                p.display(),
                a.shape(),
                first.shape(),
                spec.describe()
            );
        }
        out.push((a, format!("'{}'", p.display())));
    }
    Ok(out)
}
