//! Calibration from png/jpg images: exact tensor values, layouts, grayscale, resizing (checked
//! against PIL's bilinear numbers), every error, and one end-to-end CLI run on digit PNGs.

mod common;

use common::builder::Builder;
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use ndarray::ArrayD;
use onnx_compress::calibrate::{CalibrationSet, DataOptions, ImageOptions, Layout};
use onnx_compress::ir::Model;
use std::path::Path;

/// One input `x` of `shape` (-1 = symbolic) -> Relu.
fn relu_model(shape: &[i64]) -> Model {
    let mut b = Builder::new(13);
    b.input("x", shape).output("y", shape);
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    b.model()
}

fn load_model(name: &str) -> Model {
    onnx_compress::ir::Model::load(&common::testdata().join(name)).unwrap()
}

fn opts(image: ImageOptions) -> DataOptions {
    DataOptions {
        image,
        ..Default::default()
    }
}

/// Every sample of a calibration set, stacked: [total, ...].
fn all(set: &CalibrationSet) -> ArrayD<f32> {
    let views: Vec<_> = set
        .batches
        .iter()
        .map(|b| b[0].as_f32().unwrap().view())
        .collect();
    ndarray::concatenate(ndarray::Axis(0), &views).unwrap()
}

/// A w x h RGB image with distinct values per pixel and channel.
fn rgb_pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([0, 1, 2].map(|c| ((x * 7 + y * 13 + c * 50 + seed * 31) % 256) as u8))
    })
}

fn err(path: &Path, m: &Model, o: &DataOptions) -> String {
    format!("{:#}", CalibrationSet::load(path, m, o).unwrap_err())
}

#[test]
fn rgb_png_without_resize_gives_exact_normalised_nchw_values_in_name_order() {
    let m = load_model("conv_bn_relu.onnx");
    let spec = &onnx_compress::calibrate::data::model_inputs(&m).unwrap()[0];
    assert_eq!(
        spec.dims,
        [1, 3, 16, 16].map(onnx_compress::calibrate::data::InputDim::Fixed)
    );
    let d = tempfile::tempdir().unwrap();
    // Written in reverse name order: loading must sort by name.
    let b = rgb_pattern(16, 16, 2);
    let a = rgb_pattern(16, 16, 1);
    b.save(d.path().join("b.png")).unwrap();
    a.save(d.path().join("a.png")).unwrap();
    let mean = [0.5f32, 0.4, 0.3];
    let std = [0.2f32, 0.25, 0.5];
    let o = opts(ImageOptions {
        mean: mean.to_vec(),
        std: std.to_vec(),
        ..Default::default()
    });
    let set = CalibrationSet::load(d.path(), &m, &o).unwrap();
    assert_eq!(set.samples, 2);
    assert_eq!(set.batches.len(), 2, "the model fixes batch 1");
    let t = all(&set);
    assert_eq!(t.shape(), &[2, 3, 16, 16]);
    for (n, img) in [&a, &b].into_iter().enumerate() {
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let want = ((p[c] as f64 / 255.0 - mean[c] as f64) / std[c] as f64) as f32;
                let got = t[[n, c, y as usize, x as usize]];
                assert!(
                    (got - want).abs() <= 1e-6,
                    "{n} {c} {y} {x}: {got} vs {want}"
                );
            }
        }
    }
    // Defaults: pixel / 255, and the set is deterministic.
    let plain = all(&CalibrationSet::load(d.path(), &m, &DataOptions::default()).unwrap());
    assert!((plain[[0, 1, 3, 5]] - a.get_pixel(5, 3)[1] as f32 / 255.0).abs() < 1e-7);
    let again = all(&CalibrationSet::load(d.path(), &m, &DataOptions::default()).unwrap());
    assert_eq!(plain, again);
}

#[test]
fn nhwc_layout_is_inferred_and_can_be_forced() {
    let d = tempfile::tempdir().unwrap();
    let img = rgb_pattern(8, 8, 3);
    img.save(d.path().join("0.png")).unwrap();
    let set = CalibrationSet::load(
        d.path(),
        &relu_model(&[-1, 8, 8, 3]),
        &DataOptions::default(),
    )
    .unwrap();
    let t = all(&set);
    assert_eq!(t.shape(), &[1, 8, 8, 3]);
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            assert_eq!(
                t[[0, y as usize, x as usize, c]],
                (p[c] as f64 / 255.0) as f32
            );
        }
    }
    // [N, 3, 8, 3] reads as NCHW by default (C=3, H=8, W=3: a 8x3 image is resized);
    // --layout nhwc makes it H=3, W=8, C=3, the image's own size, so values are exact.
    let d = tempfile::tempdir().unwrap();
    let wide = rgb_pattern(8, 3, 4);
    wide.save(d.path().join("0.png")).unwrap();
    let ambiguous = relu_model(&[-1, 3, 8, 3]);
    let forced = all(&CalibrationSet::load(
        d.path(),
        &ambiguous,
        &opts(ImageOptions {
            layout: Some(Layout::Nhwc),
            ..Default::default()
        }),
    )
    .unwrap());
    assert_eq!(forced.shape(), &[1, 3, 8, 3]);
    for (x, y, p) in wide.enumerate_pixels() {
        for c in 0..3 {
            assert_eq!(
                forced[[0, y as usize, x as usize, c]],
                (p[c] as f64 / 255.0) as f32
            );
        }
    }
    let default =
        all(&CalibrationSet::load(d.path(), &ambiguous, &DataOptions::default()).unwrap());
    assert_eq!(default.shape(), &[1, 3, 8, 3]);
    assert_ne!(default, forced);
}

#[test]
fn grayscale_model_gets_luma() {
    let m = load_model("digits_cnn.onnx");
    let d = tempfile::tempdir().unwrap();
    let gray = GrayImage::from_fn(8, 8, |x, y| Luma([(x * 30 + y * 3) as u8]));
    gray.save(d.path().join("0_gray.png")).unwrap();
    // A colour image (with alpha, which is dropped) goes through BT.601 luma.
    let rgba = RgbaImage::from_pixel(8, 8, Rgba([200, 100, 50, 7]));
    rgba.save(d.path().join("1_rgba.png")).unwrap();
    let t = all(&CalibrationSet::load(d.path(), &m, &DataOptions::default()).unwrap());
    assert_eq!(t.shape(), &[2, 1, 8, 8]);
    for (x, y, p) in gray.enumerate_pixels() {
        assert_eq!(
            t[[0, 0, y as usize, x as usize]],
            (p[0] as f64 / 255.0) as f32
        );
    }
    let luma = (0.299 * 200.0 + 0.587 * 100.0 + 0.114 * 50.0) / 255.0;
    assert!(
        (t[[1, 0, 4, 4]] - luma as f32).abs() < 1e-5,
        "{}",
        t[[1, 0, 4, 4]]
    );
    // A gray image into an RGB model is repeated on the three channels.
    let rgb = all(&CalibrationSet::load(
        &d.path().join("0_gray.png"),
        &relu_model(&[-1, 3, 8, 8]),
        &DataOptions::default(),
    )
    .unwrap());
    assert_eq!(rgb[[0, 0, 2, 5]], rgb[[0, 2, 2, 5]]);
    assert_eq!(rgb[[0, 1, 2, 5]], t[[0, 0, 2, 5]]);
}

#[test]
fn jpeg_images_are_read() {
    let d = tempfile::tempdir().unwrap();
    // Flat colours survive JPEG within a couple of levels.
    RgbImage::from_pixel(16, 16, Rgb([200, 40, 120]))
        .save(d.path().join("a.jpg"))
        .unwrap();
    GrayImage::from_pixel(16, 16, Luma([90]))
        .save(d.path().join("b.jpeg"))
        .unwrap();
    let m = relu_model(&[-1, 3, 16, 16]);
    let o = opts(ImageOptions {
        scale: 1.0,
        ..Default::default()
    });
    let t = all(&CalibrationSet::load(d.path(), &m, &o).unwrap());
    assert_eq!(t.shape(), &[2, 3, 16, 16]);
    for (c, want) in [200.0, 40.0, 120.0].into_iter().enumerate() {
        assert!((t[[0, c, 8, 8]] - want).abs() <= 3.0, "{}", t[[0, c, 8, 8]]);
        assert!((t[[1, c, 8, 8]] - 90.0).abs() <= 3.0);
    }
}

#[test]
fn resize_matches_pil_bilinear_and_follows_the_model() {
    let d = tempfile::tempdir().unwrap();
    // 10 wide, 12 high, values 0..120 row-major.
    let img = GrayImage::from_fn(10, 12, |x, y| Luma([(y * 10 + x) as u8]));
    img.save(d.path().join("g.png")).unwrap();
    // Symbolic H, W: --resize 7x5 decides. Reference: PIL
    // Image.fromarray(np.arange(120, dtype=np.float32).reshape(12, 10), "F").resize((7, 5), BILINEAR)
    let pil: [[f32; 7]; 5] = [
        [
            9.546154, 10.82963, 12.264516, 13.7, 15.135484, 16.570372, 17.853848,
        ],
        [
            31.363102, 32.64658, 34.081467, 35.51695, 36.95243, 38.387318, 39.670795,
        ],
        [
            55.346153, 56.62963, 58.064518, 59.5, 60.935482, 62.37037, 63.653847,
        ],
        [
            79.3292, 80.61268, 82.04756, 83.48305, 84.91853, 86.35342, 87.6369,
        ],
        [
            101.14616, 102.42963, 103.86452, 105.3, 106.73549, 108.17037, 109.45385,
        ],
    ];
    let o = opts(ImageOptions {
        resize: Some((7, 5)),
        scale: 1.0,
        ..Default::default()
    });
    let t = all(&CalibrationSet::load(d.path(), &relu_model(&[-1, 1, -1, -1]), &o).unwrap());
    assert_eq!(t.shape(), &[1, 1, 5, 7]);
    for (y, row) in pil.iter().enumerate() {
        for (x, want) in row.iter().enumerate() {
            let got = t[[0, 0, y, x]];
            assert!((got - want).abs() < 1e-3, "({y},{x}): {got} vs PIL {want}");
        }
    }
    // Upscaling is plain bilinear on pixel centres: [0, 200] -> [0, 50, 150, 200].
    GrayImage::from_fn(2, 1, |x, _| Luma([(x * 200) as u8]))
        .save(d.path().join("g.png"))
        .unwrap();
    let up = opts(ImageOptions {
        resize: Some((4, 1)),
        scale: 1.0,
        ..Default::default()
    });
    let t = all(&CalibrationSet::load(d.path(), &relu_model(&[-1, 1, -1, -1]), &up).unwrap());
    assert_eq!(
        t.iter().copied().collect::<Vec<_>>(),
        [0.0, 50.0, 150.0, 200.0]
    );
    // Fixed H, W: a 10x12 RGB image becomes 8x8 by default; a flat image stays flat.
    RgbImage::from_pixel(10, 12, Rgb([10, 20, 30]))
        .save(d.path().join("g.png"))
        .unwrap();
    let t = all(&CalibrationSet::load(
        d.path(),
        &relu_model(&[-1, 3, 8, 8]),
        &DataOptions::default(),
    )
    .unwrap());
    assert_eq!(t.shape(), &[1, 3, 8, 8]);
    for ((_, c, _, _), v) in t
        .view()
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap()
        .indexed_iter()
    {
        let want = [10.0f32, 20.0, 30.0][c] / 255.0;
        assert!((v - want).abs() < 1e-6);
    }
}

#[test]
fn max_samples_reads_only_the_first_images() {
    let d = tempfile::tempdir().unwrap();
    for k in 0..5 {
        GrayImage::from_pixel(8, 8, Luma([k * 10]))
            .save(d.path().join(format!("{k}.png")))
            .unwrap();
    }
    // The sixth file is corrupt but is never read.
    std::fs::write(d.path().join("9.png"), b"not a png").unwrap();
    let o = DataOptions {
        max_samples: Some(3),
        ..Default::default()
    };
    let set = CalibrationSet::load(d.path(), &relu_model(&[-1, 1, 8, 8]), &o).unwrap();
    assert_eq!(set.samples, 3);
    assert!(
        set.notes.iter().any(|n| n.contains("first 3 of 6")),
        "{:?}",
        set.notes
    );
    assert_eq!(all(&set)[[2, 0, 0, 0]], 20.0 / 255.0);
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let gray_model = relu_model(&[-1, 1, 8, 8]);
    let def = DataOptions::default();
    let png = |d: &Path, name: &str, w: u32, h: u32| {
        GrayImage::from_pixel(w, h, Luma([1]))
            .save(d.join(name))
            .unwrap();
    };

    // Corrupt image.
    let d = tempfile::tempdir().unwrap();
    png(d.path(), "a.png", 8, 8);
    std::fs::write(d.path().join("b.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let e = err(d.path(), &gray_model, &def);
    assert!(
        e.contains("b.png") && e.contains("unreadable or corrupt"),
        "{e}"
    );

    // Images mixed with arrays.
    let d = tempfile::tempdir().unwrap();
    png(d.path(), "a.png", 8, 8);
    ndarray_npy::write_npy(
        d.path().join("b.npy"),
        &ndarray::Array3::<f32>::zeros((1, 8, 8)),
    )
    .unwrap();
    let e = err(d.path(), &gray_model, &def);
    assert!(
        e.contains("mixes images ('") && e.contains("a.png") && e.contains("b.npy"),
        "{e}"
    );

    // Several model inputs.
    let d = tempfile::tempdir().unwrap();
    png(d.path(), "a.png", 8, 8);
    let mut b = Builder::new(13);
    b.input("p", &[-1, 1, 8, 8])
        .input("q", &[-1, 1, 8, 8])
        .output("y", &[-1, 1, 8, 8]);
    b.node("Add", "add", &["p", "q"], &["y"], vec![]);
    let e = err(d.path(), &b.model(), &def);
    assert!(
        e.contains("single-input models only") && e.contains("2 inputs"),
        "{e}"
    );

    // Channel count neither 1 nor 3.
    let e = err(d.path(), &relu_model(&[-1, 4, 8, 8]), &def);
    assert!(
        e.contains("'x' [N, 4, 8, 8]") && e.contains("--layout"),
        "{e}"
    );
    let nchw = opts(ImageOptions {
        layout: Some(Layout::Nchw),
        ..Default::default()
    });
    let e = err(d.path(), &relu_model(&[-1, 4, 8, 8]), &nchw);
    assert!(e.contains("has 4 channels in layout nchw"), "{e}");

    // Not an image-shaped input.
    let e = err(d.path(), &relu_model(&[-1, 64]), &def);
    assert!(e.contains("rank 2") && e.contains("rank-4"), "{e}");

    // Three means for a grayscale model.
    let e = err(
        d.path(),
        &gray_model,
        &opts(ImageOptions {
            mean: vec![0.1, 0.2, 0.3],
            ..Default::default()
        }),
    );
    assert!(
        e.contains("--mean has 3 values") && e.contains("grayscale"),
        "{e}"
    );

    // A zero std.
    let e = err(
        d.path(),
        &gray_model,
        &opts(ImageOptions {
            std: vec![0.0],
            ..Default::default()
        }),
    );
    assert!(e.contains("--std") && e.contains("non-zero"), "{e}");

    // --resize against a fixed size.
    let e = err(
        d.path(),
        &gray_model,
        &opts(ImageOptions {
            resize: Some((8, 6)),
            ..Default::default()
        }),
    );
    assert!(
        e.contains("--resize 8x6 gives height 6") && e.contains("fixes height 8"),
        "{e}"
    );

    // Images of different sizes with a symbolic H, W and no --resize.
    png(d.path(), "b.png", 9, 8);
    let e = err(d.path(), &relu_model(&[-1, 1, -1, -1]), &def);
    assert!(
        e.contains("b.png") && e.contains("a.png") && e.contains("--resize"),
        "{e}"
    );

    // Unsupported image format.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a.bmp"), b"BM").unwrap();
    let e = err(d.path(), &gray_model, &def);
    assert!(
        e.contains("a.bmp") && e.contains("only .png and .jpg"),
        "{e}"
    );

    // A missing single image file.
    let e = err(&d.path().join("missing.png"), &gray_model, &def);
    assert!(
        e.contains("missing.png") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn option_parsers() {
    use onnx_compress::calibrate::image::{parse_channels, parse_resize, parse_scale};
    assert_eq!(parse_scale("1/255").unwrap(), 1.0 / 255.0);
    // The default scale gives exactly f32 `pixel / 255` for every 8-bit value.
    let d = tempfile::tempdir().unwrap();
    GrayImage::from_fn(16, 16, |x, y| Luma([(y * 16 + x) as u8]))
        .save(d.path().join("all.png"))
        .unwrap();
    let t = all(&CalibrationSet::load(
        d.path(),
        &relu_model(&[-1, 1, 16, 16]),
        &DataOptions::default(),
    )
    .unwrap());
    for (i, v) in t.iter().enumerate() {
        assert_eq!(*v, i as f32 / 255.0, "pixel {i}");
    }
    assert_eq!(parse_scale("0.5").unwrap(), 0.5);
    assert!(parse_scale("1/0").is_err());
    assert!(parse_scale("abc").unwrap_err().contains("1/255"));
    assert_eq!(parse_resize("224x160").unwrap(), (224, 160));
    assert!(parse_resize("224").is_err());
    assert!(parse_resize("0x5").is_err());
    assert_eq!(parse_channels("0.5, 0.25,1").unwrap(), vec![0.5, 0.25, 1.0]);
    assert_eq!(parse_channels("2").unwrap(), vec![2.0]);
    assert!(parse_channels("1,2").unwrap_err().contains("1 or 3 values"));
    assert!(parse_channels("1,x,2").is_err());
}

#[test]
fn cli_quantizes_digits_from_png_calibration_images() {
    let td = common::testdata();
    let x: ndarray::Array4<f32> = ndarray_npy::read_npy(td.join("digits_calib_x.npy")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let pngs = d.path().join("pngs");
    std::fs::create_dir(&pngs).unwrap();
    for (k, s) in x.outer_iter().enumerate() {
        let img = GrayImage::from_fn(8, 8, |c, r| {
            Luma([(s[[0, r as usize, c as usize]] * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8])
        });
        img.save(pngs.join(format!("{k:04}.png"))).unwrap();
    }
    let out = d.path().join("q.onnx");
    let report = d.path().join("r.json");
    let (code, stdout, stderr) = common::run(&[
        td.join("digits_cnn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        pngs.to_str().unwrap(),
        "--eval",
        td.join("digits_test_x.npy").to_str().unwrap(),
        "--eval-labels",
        td.join("digits_test_y.npy").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        // The defaults, spelled out: exercises the parsing of every image option.
        "--scale",
        "1/255",
        "--mean",
        "0",
        "--std",
        "1",
        "--layout",
        "nchw",
        "--resize",
        "8x8",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let acc = json["validation"]["outputs"][0]["accuracy_candidate"]
        .as_f64()
        .unwrap_or_else(|| panic!("no accuracy in {json:#}"));
    assert!(acc >= 0.99, "int8 accuracy {acc} with PNG calibration");
}
