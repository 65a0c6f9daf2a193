//! Reading calibration and evaluation files into typed [`Feed`]s, one [`Sample`] per input and
//! file: a directory of `.npy` (`<input>_NNN.npy`, or any names for a one-input model) or
//! `.npz` files (keys = input names), a single `.npy`/`.npz`, or png/jpg images for a one-input
//! image model (see [`super::image`]).
//!
//! Each array is converted to the input's declared element type when that is exact (float64 is
//! narrowed to float32 with a note; int32 ids feed an int64 input; a float array for an integer
//! input, or a value out of the declared type's range, is refused naming the input). Its rank is
//! the declared rank (as given: a batch along the input's batch axis, see [`super::inputs`]) or,
//! for an input with a batch axis, one less (one sample: the batch axis is inserted). Fixed dims
//! other than the batch axis must match. Errors name the file (and key), the input, the expected
//! and the found shape or type.

use super::image::{self, ImageOptions, IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS};
use super::inputs::{InputDim, InputSpec};
use crate::limits::{element_count, MemoryBudget};
use crate::runtime::Feed;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{NpzReader, ReadNpyExt};
use std::path::{Path, PathBuf};

/// Options for reading calibration data.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Samples per inference batch when the model does not fix its batch size.
    pub batch_size: usize,
    /// Use at most this many samples (the first ones, in file order).
    pub max_samples: Option<usize>,
    /// Full shapes fixing symbolic input dims (`--input-shape`), by input name.
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// `--batch-axis NAME=AXIS|none`: the batch axis of named inputs (`None`: no batch axis).
    pub batch_axes: Vec<(String, Option<usize>)>,
    /// How image files (png/jpg) become tensors; ignored for .npy/.npz data.
    pub image: ImageOptions,
    /// Synthetic samples and decoded images, both sized from the model's dims, must fit.
    pub memory: MemoryBudget,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            batch_size: 32,
            max_samples: None,
            input_shapes: Vec::new(),
            batch_axes: Vec::new(),
            image: ImageOptions::default(),
            memory: MemoryBudget::default(),
        }
    }
}

/// One input's value read from a file, with its batch axis (when the input has one).
pub(crate) struct Sample {
    pub data: Feed,
    pub origin: String,
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn read_dir(
    dir: &Path,
    specs: &[InputSpec],
    opts: &DataOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Vec<Sample>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading calibration directory '{}'", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let ext = |p: &Path| image::extension(p);
    if let Some(p) = files
        .iter()
        .find(|p| UNSUPPORTED_IMAGE_EXTENSIONS.contains(&ext(p).as_str()))
    {
        bail!(
            "calibration image '{}' is a .{} file; only .png and .jpg/.jpeg images are read: convert it",
            p.display(),
            ext(p)
        );
    }
    let images: Vec<PathBuf> = files
        .iter()
        .filter(|p| IMAGE_EXTENSIONS.contains(&ext(p).as_str()))
        .cloned()
        .collect();
    let npy: Vec<&PathBuf> = files.iter().filter(|p| ext(p) == "npy").collect();
    let npz: Vec<&PathBuf> = files.iter().filter(|p| ext(p) == "npz").collect();
    if !images.is_empty() {
        if let Some(array) = npy.first().or(npz.first()) {
            bail!(
                "calibration directory '{}' mixes images ('{}') and arrays ('{}'): keep one kind per directory",
                dir.display(),
                images[0].display(),
                array.display()
            );
        }
        return read_images(&images, &dir.display().to_string(), specs, opts, notes);
    }
    if npy.is_empty() && npz.is_empty() {
        bail!(
            "calibration directory '{}' holds no .npy or .npz files (nor .png/.jpg images)",
            dir.display()
        );
    }
    let mut per_input: Vec<Vec<Sample>> = specs.iter().map(|_| Vec::new()).collect();
    for p in &npz {
        for (k, s) in read_npz(p, specs, notes)?.into_iter().enumerate() {
            per_input[k].push(s);
        }
    }
    if specs.len() == 1 {
        for p in &npy {
            per_input[0].push(read_npy_sample(p, &specs[0], notes)?);
        }
    } else {
        for p in &npy {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let owner = specs.iter().position(|s| {
                [s.name.clone(), sanitize(&s.name)].iter().any(|n| {
                    stem.strip_prefix(n.as_str())
                        .and_then(|rest| rest.strip_prefix('_'))
                        .is_some_and(|num| {
                            !num.is_empty() && num.chars().all(|c| c.is_ascii_digit())
                        })
                })
            });
            let Some(k) = owner else {
                bail!(
                    "calibration file '{}' does not name a model input: with several inputs, files must be called <input>_NNN.npy for inputs {}",
                    p.display(),
                    specs.iter().map(|s| format!("'{}'", s.name)).collect::<Vec<_>>().join(", ")
                );
            };
            per_input[k].push(read_npy_sample(p, &specs[k], notes)?);
        }
    }
    Ok(per_input)
}

pub(crate) fn read_file(
    path: &Path,
    specs: &[InputSpec],
    opts: &DataOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Vec<Sample>>> {
    let ext = image::extension(path);
    if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        return read_images(
            &[path.to_path_buf()],
            &path.display().to_string(),
            specs,
            opts,
            notes,
        );
    }
    match ext.as_str() {
        "npy" => {
            ensure!(
                specs.len() == 1,
                "calibration file '{}' is a single .npy array but the model has {} inputs; use an .npz with keys {} or a directory of <input>_NNN.npy files",
                path.display(),
                specs.len(),
                specs.iter().map(|s| format!("'{}'", s.name)).collect::<Vec<_>>().join(", ")
            );
            Ok(vec![vec![read_npy_sample(path, &specs[0], notes)?]])
        }
        "npz" => Ok(read_npz(path, specs, notes)?
            .into_iter()
            .map(|s| vec![s])
            .collect()),
        e if UNSUPPORTED_IMAGE_EXTENSIONS.contains(&e) => bail!(
            "calibration image '{}' is a .{e} file; only .png and .jpg/.jpeg images are read: convert it",
            path.display()
        ),
        _ => bail!(
            "calibration file '{}' is not a .npy, .npz, .png or .jpg file",
            path.display()
        ),
    }
}

/// Images feed single-input models: one sample per file, the first `max_samples` files only.
fn read_images(
    files: &[PathBuf],
    source: &str,
    specs: &[InputSpec],
    opts: &DataOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Vec<Sample>>> {
    ensure!(
        specs.len() == 1,
        "calibration data '{source}' holds images, but images feed single-input models only and this model has {} inputs ({}); give .npy/.npz data instead",
        specs.len(),
        specs.iter().map(|s| s.describe()).collect::<Vec<_>>().join(", ")
    );
    let mut files = files;
    if let Some(max) = opts.max_samples {
        if files.len() > max {
            notes.push(format!(
                "using the first {max} of {} calibration images",
                files.len()
            ));
            files = &files[..max];
        }
    }
    // Each image is resized to the model's fixed dims: check that before decoding any.
    let fixed: Vec<usize> = specs[0]
        .dims
        .iter()
        .skip(1)
        .map(|d| match d {
            InputDim::Fixed(v) => *v,
            InputDim::Symbolic(_) => 1,
        })
        .collect();
    let what = format!("calibration images for model input {}", specs[0].describe());
    let per_image = element_count(&what, &fixed)? as u64;
    opts.memory.check_elements(
        &format!("{what} ({} images)", files.len()),
        per_image.saturating_mul(files.len() as u64),
        4,
    )?;
    let loaded = image::load_images(files, &specs[0], &opts.image)
        .with_context(|| format!("calibration images '{source}'"))?;
    Ok(vec![loaded
        .into_iter()
        .map(|(data, origin)| Sample {
            data: Feed::F32(data),
            origin,
        })
        .collect()])
}

/// Decode .npy bytes in the element type they hold, or say which dtype the file holds.
fn decode_npy(bytes: &[u8], origin: &str) -> Result<Feed> {
    macro_rules! try_as {
        ($($t:ty => $v:ident),*) => {$(
            if let Ok(a) = ArrayD::<$t>::read_npy(bytes) {
                return Ok(Feed::$v(a));
            }
        )*};
    }
    try_as!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, i16 => I16, i8 => I8,
        u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool);
    let descr = npy_descr(bytes).unwrap_or_else(|| "an unreadable header".into());
    bail!("calibration file {origin} holds {descr}; expected a float, integer or bool array")
}

/// The `descr` entry of an .npy header, e.g. `'<i8'`.
fn npy_descr(bytes: &[u8]) -> Option<String> {
    ensure_magic(bytes)?;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
    let at = text.find("'descr'")?;
    let rest = &text[at + 7..];
    let start = rest.find('\'')? + 1;
    let end = start + rest[start..].find('\'')?;
    Some(format!("dtype '{}'", &rest[start..end]))
}

fn ensure_magic(bytes: &[u8]) -> Option<()> {
    (bytes.len() > 10 && &bytes[..6] == b"\x93NUMPY").then_some(())
}

/// Convert to the declared type, add the batch axis to a single sample, check fixed dims.
fn fit(data: Feed, spec: &InputSpec, origin: &str, notes: &mut Vec<String>) -> Result<Sample> {
    let found = data.type_name();
    if data.data_type() == crate::onnx::proto::tensor_proto::DataType::Double
        && spec.elem_type == crate::onnx::proto::tensor_proto::DataType::Float
    {
        let note = "float64 calibration data narrowed to float32".to_string();
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    let mut a = data.convert(spec.elem_type).with_context(|| {
        format!(
            "calibration file {origin} for model input {}: expected {} data, found {found}",
            spec.describe(),
            spec.type_name()
        )
    })?;
    let rank = spec.dims.len();
    if let Some(axis) = spec.batch_axis {
        if a.ndim() + 1 == rank {
            a = a.insert_axis(axis);
        }
    }
    let expected = match spec.batch_axis {
        Some(axis) => format!(
            "one sample of rank {} or a batch of rank {rank} (batch axis {axis})",
            rank.saturating_sub(1)
        ),
        None => format!("rank {rank} (this input has no batch axis)"),
    };
    ensure!(
        a.ndim() == rank,
        "calibration file {origin} has shape {:?}; model input {} expects {expected}",
        a.shape(),
        spec.describe(),
    );
    for (i, (d, &got)) in spec.dims.iter().zip(a.shape()).enumerate() {
        if Some(i) == spec.batch_axis {
            continue;
        }
        if let InputDim::Fixed(want) = d {
            ensure!(
                *want == got,
                "calibration file {origin} has shape {:?}; model input {} needs size {want} at dimension {i}{}",
                a.shape(),
                spec.describe(),
                match spec.batch_axis {
                    Some(b) => format!(" (batch axis {b}; --batch-axis {}=AXIS chooses another)", spec.name),
                    None => String::new(),
                }
            );
        }
    }
    if let Some(axis) = spec.batch_axis {
        ensure!(
            a.shape()[axis] > 0,
            "calibration file {origin} holds an empty batch"
        );
    }
    ensure!(
        a.all_finite(),
        "calibration file {origin} holds NaN or infinite values"
    );
    Ok(Sample {
        data: a,
        origin: origin.to_string(),
    })
}

fn read_npy_sample(path: &Path, spec: &InputSpec, notes: &mut Vec<String>) -> Result<Sample> {
    let origin = format!("'{}'", path.display());
    let bytes =
        std::fs::read(path).with_context(|| format!("reading calibration file {origin}"))?;
    let a = decode_npy(&bytes, &origin)?;
    fit(a, spec, &origin, notes)
}

fn read_npz(path: &Path, specs: &[InputSpec], notes: &mut Vec<String>) -> Result<Vec<Sample>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening calibration archive '{}'", path.display()))?;
    let mut z = NpzReader::new(file)
        .with_context(|| format!("reading calibration archive '{}'", path.display()))?;
    let names = z
        .names()
        .with_context(|| format!("listing calibration archive '{}'", path.display()))?;
    let mut out = Vec::new();
    for spec in specs {
        let key = names
            .iter()
            .find(|n| {
                let n = n.strip_suffix(".npy").unwrap_or(n);
                n == spec.name || n == sanitize(&spec.name)
            })
            .or_else(|| (specs.len() == 1 && names.len() == 1).then(|| &names[0]))
            .with_context(|| {
                format!(
                    "calibration archive '{}' has no array for model input '{}' (keys: {:?})",
                    path.display(),
                    spec.name,
                    names
                )
            })?
            .clone();
        let origin = format!("'{}' key '{key}'", path.display());
        let a = npz_array(&mut z, &key).with_context(|| {
            format!("calibration array {origin} is not a float, integer or bool array")
        })?;
        out.push(fit(a, spec, &origin, notes)?);
    }
    Ok(out)
}

/// One array of an archive in the element type it holds.
fn npz_array(z: &mut NpzReader<std::fs::File>, key: &str) -> Result<Feed> {
    macro_rules! try_as {
        ($($t:ty => $v:ident),*) => {$(
            if let Ok(a) = z.by_name::<ndarray::OwnedRepr<$t>, IxDyn>(key) {
                return Ok(Feed::$v(a));
            }
        )*};
    }
    try_as!(f32 => F32, f64 => F64, i64 => I64, i32 => I32, i16 => I16, i8 => I8,
        u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool);
    bail!("unsupported element type")
}
