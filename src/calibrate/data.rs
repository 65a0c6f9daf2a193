//! Calibration data: loading, checking against the model's inputs, batching.
//!
//! Accepted sources (`--calib PATH`):
//! - a directory of `.npy` files. A one-input model reads every `.npy` file (sorted by name);
//!   a model with several inputs reads `<input>_NNN.npy` (input name as is, or with every
//!   character outside `[A-Za-z0-9_.-]` replaced by `_`), and each input needs the same number
//!   of samples;
//! - a directory of `.npz` files, whose keys are the input names (a one-input model also
//!   accepts an archive holding exactly one array under any key);
//! - a single `.npy` file (one-input models) or a single `.npz` file.
//!
//! Each array holds one sample (the input's shape without its leading batch dimension) or a
//! batch (the full rank; the leading dimension counts samples). Dimensions the model fixes must
//! match; symbolic ones may be anything but must agree across samples. float32 and float64
//! arrays are accepted (float64 is narrowed).
//!
//! A single-input model with an image input (`[N, C, H, W]` or `[N, H, W, C]`, `C` 1 or 3) also
//! reads a directory of `.png` / `.jpg` files or one image file, one sample per image, resized
//! and normalised as [`DataOptions::image`] says (see [`super::image`] for every step). A
//! directory holds either images or arrays, not both.
//!
//! Everything is read and checked before any inference starts, so a bad file fails the run
//! early with the file's path and what was expected.
//!
//! Without data, [`CalibrationSet::synthetic`] makes seeded standard-normal inputs and says
//! loudly that the ranges are then meaningless for real inputs.

use super::image::{self, ImageOptions, IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS};
use super::inputs::with_shapes;
pub use super::inputs::{model_inputs, InputDim, InputSpec};
use crate::ir::Model;
use crate::limits::{check_synthetic, element_count, MemoryBudget};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{ArrayD, Axis, IxDyn};
use ndarray_npy::{NpzReader, ReadNpyExt};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_lite::standard_normal;
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
            image: ImageOptions::default(),
            memory: MemoryBudget::default(),
        }
    }
}

/// Calibration inputs, checked against the model and cut into batches.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    /// Graph input names, in the order of each batch's arrays.
    pub input_names: Vec<String>,
    /// Each batch holds one array per input with a leading batch dimension.
    pub batches: Vec<Vec<ArrayD<f32>>>,
    pub samples: usize,
    /// Where the data came from (path or "synthetic").
    pub source: String,
    /// True for generated data.
    pub synthetic: bool,
    /// Remarks for the report (narrowed float64, truncated sample count, synthetic data...).
    pub notes: Vec<String>,
}

impl CalibrationSet {
    /// The batches with each array paired with its input name (equalization and pruning).
    pub fn named_batches(&self) -> Vec<crate::calibrate::NamedBatch> {
        self.batches
            .iter()
            .map(|b| {
                self.input_names
                    .iter()
                    .cloned()
                    .zip(b.iter().cloned())
                    .collect()
            })
            .collect()
    }

    /// Read calibration data from a file or directory and check it against `model`.
    pub fn load(path: &Path, model: &Model, opts: &DataOptions) -> Result<CalibrationSet> {
        let specs = with_shapes(model_inputs(model)?, &opts.input_shapes);
        ensure!(
            !specs.is_empty(),
            "the model has no float inputs to calibrate"
        );
        let mut notes = Vec::new();
        let per_input: Vec<Vec<Sample>> = if path.is_dir() {
            read_dir(path, &specs, opts, &mut notes)?
        } else if path.is_file() {
            read_file(path, &specs, opts, &mut notes)?
        } else {
            bail!(
                "calibration data '{}' does not exist (expected a directory of .npy/.npz or .png/.jpg files, or one such file)",
                path.display()
            );
        };
        Self::assemble(specs, per_input, opts, path.display().to_string(), notes)
    }

    /// Seeded standard-normal inputs: `samples` samples; symbolic non-batch dims are refused.
    pub fn synthetic(model: &Model, samples: usize, seed: u64, opts: &DataOptions) -> Result<Self> {
        let specs = with_shapes(model_inputs(model)?, &opts.input_shapes);
        ensure!(
            !specs.is_empty(),
            "the model has no float inputs to calibrate"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut per_input = Vec::new();
        for spec in &specs {
            let mut shape = Vec::new();
            for (i, d) in spec.dims.iter().enumerate().skip(1) {
                match d {
                    InputDim::Fixed(v) => shape.push(*v),
                    InputDim::Symbolic(s) => bail!(
                        "model input {} has symbolic dimension {i} ('{s}'): synthetic calibration data needs fixed sizes; pass --calib with real data",
                        spec.describe()
                    ),
                }
            }
            // Generation is O(elements): bounded in work first, then in memory.
            let what = format!(
                "synthetic calibration data for model input {}",
                spec.describe()
            );
            let n = element_count(&what, &shape)?;
            let values = (n as u64).saturating_mul(samples as u64);
            // Twice: the samples, then their stack (see `assemble`).
            opts.memory.check_elements(
                &format!("{what} ({samples} samples, held twice while batched)"),
                values.saturating_mul(2),
                4,
            )?;
            check_synthetic(&format!("{what} ({samples} samples)"), values)?;
            let mut list = Vec::new();
            for k in 0..samples {
                let v: Vec<f32> = (0..n).map(|_| standard_normal(&mut rng)).collect();
                let a = ArrayD::from_shape_vec(IxDyn(&shape), v).context("synthetic sample")?;
                list.push(Sample {
                    data: a.insert_axis(Axis(0)),
                    origin: format!("synthetic #{k}"),
                });
            }
            per_input.push(list);
        }
        let note = format!(
            "WARNING: no calibration data given; ranges come from {samples} synthetic standard-normal samples (seed {seed}) and will not match real inputs: pass --calib DIR for a usable int8 model"
        );
        let mut set = Self::assemble(specs, per_input, opts, "synthetic".into(), vec![note])?;
        set.synthetic = true;
        Ok(set)
    }

    fn assemble(
        specs: Vec<InputSpec>,
        per_input: Vec<Vec<Sample>>,
        opts: &DataOptions,
        source: String,
        mut notes: Vec<String>,
    ) -> Result<CalibrationSet> {
        // Stack each input's samples into one [total, ...] array, dropping the samples as
        // each input is stacked and the stack once cut into batches: at most twice the data
        // is held at once (what the synthetic data's budget check charges).
        let mut stacked = Vec::new();
        for (spec, samples) in specs.iter().zip(per_input) {
            ensure!(
                !samples.is_empty(),
                "calibration data '{source}' holds no sample for model input {}",
                spec.describe()
            );
            let first = &samples[0];
            for s in &samples {
                ensure!(
                    s.data.shape()[1..] == first.data.shape()[1..],
                    "calibration sample {} has shape {:?} but {} has {:?}: samples of input '{}' must share a shape",
                    s.origin,
                    &s.data.shape()[1..],
                    first.origin,
                    &first.data.shape()[1..],
                    spec.name
                );
            }
            let views: Vec<_> = samples.iter().map(|s| s.data.view()).collect();
            let all = ndarray::concatenate(Axis(0), &views)
                .with_context(|| format!("stacking samples of input '{}'", spec.name))?;
            drop(views);
            drop(samples);
            stacked.push(all);
        }
        let mut total = stacked[0].shape()[0];
        for (spec, a) in specs.iter().zip(&stacked) {
            ensure!(
                a.shape()[0] == total,
                "calibration data '{source}': input '{}' has {} samples but '{}' has {total}; every input needs the same count",
                spec.name,
                a.shape()[0],
                specs[0].name
            );
        }
        if let Some(max) = opts.max_samples {
            if total > max {
                notes.push(format!(
                    "using the first {max} of {total} calibration samples"
                ));
                total = max;
            }
        }
        ensure!(total > 0, "calibration data '{source}' holds no samples");
        let fixed = specs.iter().find_map(|s| s.fixed_batch());
        let batch = fixed.unwrap_or(opts.batch_size.max(1));
        let mut batches: Vec<Vec<ArrayD<f32>>> = Vec::new();
        let mut start = 0;
        while start < total {
            let end = (start + batch).min(total);
            if fixed.is_some() && end - start < batch {
                notes.push(format!(
                    "the model fixes batch size {batch}: the last {} calibration sample(s) are not used",
                    end - start
                ));
                break;
            }
            batches.push(
                stacked
                    .iter()
                    .map(|a| a.slice_axis(Axis(0), (start..end).into()).to_owned())
                    .collect(),
            );
            start = end;
        }
        drop(stacked);
        ensure!(
            !batches.is_empty(),
            "calibration data '{source}' has {total} samples, fewer than the model's fixed batch size {batch}"
        );
        Ok(CalibrationSet {
            input_names: specs.into_iter().map(|s| s.name).collect(),
            samples: batches.iter().map(|b| b[0].shape()[0]).sum(),
            batches,
            source,
            synthetic: false,
            notes,
        })
    }
}

/// One array read from a file, already with a leading batch dimension.
struct Sample {
    data: ArrayD<f32>,
    origin: String,
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

fn read_dir(
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

fn read_file(
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
        .map(|(data, origin)| Sample { data, origin })
        .collect()])
}

/// Decode .npy bytes as f32 (float64 narrowed), or say which dtype the file holds.
fn decode_npy(bytes: &[u8], origin: &str, notes: &mut Vec<String>) -> Result<ArrayD<f32>> {
    if let Ok(a) = ArrayD::<f32>::read_npy(bytes) {
        return Ok(a);
    }
    match ArrayD::<f64>::read_npy(bytes) {
        Ok(a) => {
            let note = "float64 calibration data narrowed to float32".to_string();
            if !notes.contains(&note) {
                notes.push(note);
            }
            Ok(a.mapv(|v| v as f32))
        }
        Err(e) => {
            let descr = npy_descr(bytes).unwrap_or_else(|| "an unreadable header".into());
            bail!("calibration file {origin} holds {descr}; expected a float32 (or float64) array ({e})")
        }
    }
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

/// Add a batch axis to a single sample, check fixed dims.
fn fit(mut a: ArrayD<f32>, spec: &InputSpec, origin: &str) -> Result<Sample> {
    let rank = spec.dims.len();
    if a.ndim() + 1 == rank {
        a = a.insert_axis(Axis(0));
    }
    ensure!(
        a.ndim() == rank,
        "calibration file {origin} has shape {:?}; model input {} expects one sample of rank {} or a batch of rank {rank}",
        a.shape(),
        spec.describe(),
        rank.saturating_sub(1)
    );
    for (i, (d, &got)) in spec.dims.iter().zip(a.shape()).enumerate().skip(1) {
        if let InputDim::Fixed(want) = d {
            ensure!(
                *want == got,
                "calibration file {origin} has shape {:?}; model input {} needs size {want} at dimension {i}",
                a.shape(),
                spec.describe()
            );
        }
    }
    ensure!(
        a.shape()[0] > 0,
        "calibration file {origin} holds an empty batch"
    );
    ensure!(
        a.iter().all(|v| v.is_finite()),
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
    let a = decode_npy(&bytes, &origin, notes)?;
    fit(a, spec, &origin)
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
        let a: ArrayD<f32> = match z.by_name::<ndarray::OwnedRepr<f32>, IxDyn>(&key) {
            Ok(a) => a,
            Err(_) => {
                let b = z
                    .by_name::<ndarray::OwnedRepr<f64>, IxDyn>(&key)
                    .with_context(|| {
                        format!("calibration array {origin} is not float32 or float64")
                    })?;
                let note = "float64 calibration data narrowed to float32".to_string();
                if !notes.contains(&note) {
                    notes.push(note);
                }
                b.mapv(|v| v as f32)
            }
        };
        out.push(fit(a, spec, &origin)?);
    }
    Ok(out)
}

/// A tiny standard-normal sampler (Box-Muller) so the crate needs no `rand_distr`.
mod rand_distr_lite {
    use rand::Rng;
    pub fn standard_normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}
