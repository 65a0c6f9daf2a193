//! Running a `ModelProto` in tract 0.23.9: load (value_info ignored, so symbolic annotations
//! cannot clash with pinned input shapes), pin every input's type and shape, optionally expose
//! intermediate tensors as extra outputs, optimize once, run many times.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use ndarray::ArrayD;
use prost::Message;
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTensor,
    OutletId, TValue, TVec, TypedRunnableModel,
};
use tract_onnx::tract_hir::infer::Factoid;

use super::feed::RunInput;
use super::support::refusal;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::onnx::proto::type_proto::Value;
use crate::onnx::proto::ModelProto;

/// A graph input with the concrete shape it runs at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InputSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// ONNX element type code (`TensorProto.DataType`).
    #[serde(skip)]
    pub elem_type: i32,
    /// ONNX element type name, lower case (`float`, `int64`, ...).
    pub elem_type_name: String,
}

/// Resolves every real graph input (initializer-backed inputs excluded) to a concrete shape:
/// the user's shape when given (it must agree with the declared fixed dims), else the declared
/// shape with each symbolic or unknown dim set to 1 (one note per input where that happened).
pub fn resolve_input_shapes(
    model: &ModelProto,
    overrides: &[(String, Vec<usize>)],
) -> Result<(Vec<InputSpec>, Vec<String>)> {
    let graph = model.graph.as_ref().context("model has no graph")?;
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name()).collect();
    let mut specs = Vec::new();
    let mut notes = Vec::new();
    for (name, _) in overrides {
        ensure!(
            graph
                .input
                .iter()
                .any(|i| i.name() == name && !inits.contains(i.name())),
            "input shape given for '{name}', which is not an input of the model"
        );
    }
    for input in graph.input.iter().filter(|i| !inits.contains(i.name())) {
        let name = input.name();
        let Some(Value::TensorType(tt)) = input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            bail!("input '{name}' is not a tensor");
        };
        let declared: Option<Vec<Option<usize>>> = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v >= 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        });
        let shape = match (overrides.iter().find(|(n, _)| n == name), &declared) {
            (Some((_, user)), Some(decl)) => {
                ensure!(
                    user.len() == decl.len(),
                    "input '{name}': shape {user:?} has rank {}, the model declares rank {}",
                    user.len(),
                    decl.len()
                );
                for (i, (u, d)) in user.iter().zip(decl).enumerate() {
                    if let Some(d) = d {
                        ensure!(
                            u == d,
                            "input '{name}': dim {i} is fixed to {d} by the model, got {u}"
                        );
                    }
                }
                user.clone()
            }
            (Some((_, user)), None) => user.clone(),
            (None, Some(decl)) => {
                if decl.iter().any(Option::is_none) {
                    let shown: Vec<String> = decl
                        .iter()
                        .map(|d| d.map_or("?".into(), |v| v.to_string()))
                        .collect();
                    notes.push(format!(
                        "input '{name}' has symbolic dims [{}]; ran them at 1 (pass an input shape to choose)",
                        shown.join(", ")
                    ));
                }
                decl.iter().map(|d| d.unwrap_or(1)).collect()
            }
            (None, None) => bail!("input '{name}' declares no shape; give one explicitly"),
        };
        // A shape no runtime could hold is an invalid model, not a wrapped-around size.
        crate::limits::element_count(&format!("input '{name}'"), &shape)?;
        let elem_type = tt.elem_type();
        specs.push(InputSpec {
            name: name.to_string(),
            shape,
            elem_type,
            elem_type_name: super::tensor::dtype_name(elem_type),
        });
    }
    Ok((specs, notes))
}

pub(crate) fn datum_type(code: i32) -> Result<DatumType> {
    Ok(match DataType::try_from(code) {
        Ok(DataType::Float) => DatumType::F32,
        Ok(DataType::Double) => DatumType::F64,
        Ok(DataType::Float16) => DatumType::F16,
        Ok(DataType::Int8) => DatumType::I8,
        Ok(DataType::Uint8) => DatumType::U8,
        Ok(DataType::Int16) => DatumType::I16,
        Ok(DataType::Uint16) => DatumType::U16,
        Ok(DataType::Int32) => DatumType::I32,
        Ok(DataType::Uint32) => DatumType::U32,
        Ok(DataType::Int64) => DatumType::I64,
        Ok(DataType::Uint64) => DatumType::U64,
        Ok(DataType::Bool) => DatumType::Bool,
        _ => bail!(
            "element type {} cannot be fed to tract",
            super::tensor::dtype_name(code)
        ),
    })
}

fn onnx_code(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        DatumType::F16 => DataType::Float16,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::I16 => DataType::Int16,
        DatumType::U16 => DataType::Uint16,
        DatumType::I32 => DataType::Int32,
        DatumType::U32 => DataType::Uint32,
        DatumType::I64 => DataType::Int64,
        DatumType::U64 => DataType::Uint64,
        DatumType::Bool => DataType::Bool,
        DatumType::String => DataType::String,
        _ => return None,
    })
}

/// Parses `model` with tract (value_info ignored), without pinning anything. Large untouched
/// weights go by reference ([`super::by_reference`]), not through the encoding.
fn load(model: &ModelProto) -> Result<InferenceModel> {
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let referenced = super::by_reference::with_references(model);
    let (proto, dir) = match referenced {
        Some((light, dir, resolver)) => {
            onnx.provider = Arc::new(resolver);
            (std::borrow::Cow::Owned(light), Some(dir))
        }
        None => (std::borrow::Cow::Borrowed(model), None),
    };
    let bytes = proto.encode_to_vec();
    drop(proto);
    let pb = tract_onnx::pb::ModelProto::decode(bytes.as_slice())
        .context("re-reading the model as tract's protobuf")?;
    // Each copy of the weights is dropped as soon as the next exists (a 2 GiB model).
    drop(bytes);
    let dir = dir.as_ref().and_then(|d| d.to_str());
    let parsed = onnx
        .parse(&pb, dir)
        .map_err(|e| anyhow!("{e:#}"))
        .context("tract 0.23.9 could not load the model")?;
    ensure!(
        parsed.unresolved_inputs.is_empty(),
        "tract 0.23.9 could not load the model: unresolved inputs {:?}",
        parsed.unresolved_inputs
    );
    Ok(parsed.model)
}

fn pin_inputs(im: &mut InferenceModel, specs: &[InputSpec]) -> Result<()> {
    let outlets = im.input_outlets().map_err(|e| anyhow!("{e:#}"))?.to_vec();
    ensure!(
        outlets.len() == specs.len(),
        "tract sees {} inputs, the model declares {}",
        outlets.len(),
        specs.len()
    );
    for (ix, (outlet, spec)) in outlets.iter().zip(specs).enumerate() {
        let tract_name = &im.node(outlet.node).name;
        ensure!(
            tract_name == &spec.name,
            "tract input #{ix} is '{tract_name}', expected '{}'",
            spec.name
        );
        let fact = InferenceFact::dt_shape(datum_type(spec.elem_type)?, spec.shape.clone());
        im.set_input_fact(ix, fact).map_err(|e| anyhow!("{e:#}"))?;
    }
    Ok(())
}

/// ONNX value name -> tract outlet, for every labeled outlet plus sources and initializer consts
/// (tract names those nodes after the tensor and does not label them).
fn outlets_by_name(im: &InferenceModel, model: &ModelProto) -> HashMap<String, OutletId> {
    let mut map = HashMap::new();
    if let Some(g) = &model.graph {
        for name in g
            .input
            .iter()
            .map(|i| i.name())
            .chain(g.initializer.iter().map(|t| t.name()))
        {
            if let Ok(id) = im.node_id_by_name(name) {
                map.insert(name.to_string(), OutletId::new(id, 0));
            }
        }
    }
    for node in im.nodes() {
        for ix in 0..node.outputs.len() {
            let o = OutletId::new(node.id, ix);
            if let Some(label) = im.outlet_label(o) {
                map.insert(label.to_string(), o);
            }
        }
    }
    map
}

/// A model loaded, pinned, optimized and ready to run many batches (calibration reuses it).
#[derive(Debug, Clone)]
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
    output_names: Vec<String>,
    notes: Vec<String>,
}

thread_local! {
    static IN_TRACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run tract code, turning a panic inside tract (seen on real models, e.g. an index out of
/// bounds in Gather while typing an If branch) into an error, without printing the panic.
pub(crate) fn guard_tract<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_TRACT.with(|t| t.get()) {
                default(info);
            }
        }));
    });
    let was = IN_TRACT.with(|t| t.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_TRACT.with(|t| t.set(was));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            bail!("tract 0.23.9 crashed on this model ({msg})")
        }
    }
}

impl Runner {
    /// Loads `model` in tract with every input pinned (see [`resolve_input_shapes`]) and outputs
    /// = the graph outputs followed by `extra_outputs` (ONNX value names, exposed before
    /// optimization, so tract cannot fuse across them: numbers may differ from the plain run in the
    /// last ulp where a fusion would have happened).
    ///
    /// Refuses models tract 0.23.9 would misread (see `support`); quantized models usually need
    /// [`super::simulation_graph`] first.
    pub fn new(
        model: &ModelProto,
        input_shapes: &[(String, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<Self> {
        let _deadline = crate::limits::watch::start(
            "tract's analysis of the model",
            crate::limits::watch::analysis_budget(model.encoded_len() as u64),
        );
        guard_tract(|| Self::new_unguarded(model, input_shapes, extra_outputs))
    }

    fn new_unguarded(
        model: &ModelProto,
        input_shapes: &[(String, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<Self> {
        if let Some(reason) = refusal(model) {
            bail!("not run in tract: {reason}");
        }
        let (inputs, notes) = resolve_input_shapes(model, input_shapes)?;
        let mut im = load(model)?;
        pin_inputs(&mut im, &inputs)?;
        let graph = model.graph.as_ref().context("model has no graph")?;
        let mut output_names: Vec<String> =
            graph.output.iter().map(|o| o.name().to_string()).collect();
        if !extra_outputs.is_empty() {
            let by_name = outlets_by_name(&im, model);
            let mut outlets = im.output_outlets().map_err(|e| anyhow!("{e:#}"))?.to_vec();
            for name in extra_outputs {
                let o = by_name.get(name).with_context(|| {
                    format!("extra output '{name}' is not a tensor of the model")
                })?;
                outlets.push(*o);
                output_names.push(name.clone());
            }
            im.select_output_outlets(&outlets)
                .map_err(|e| anyhow!("{e:#}"))?;
        }
        let has_if = graph.node.iter().any(|n| n.op_type() == "If");
        let typed = im.into_optimized().map_err(|e| {
            let hint = if has_if && format!("{e:#}").contains(" If") {
                " (tract 0.23.9 needs both branches of an If with a non-constant condition to \
                 produce the same shapes)"
            } else {
                ""
            };
            anyhow!("tract 0.23.9 could not analyse/optimize the model: {e:#}{hint}")
        })?;
        let plan = typed.into_runnable().map_err(|e| anyhow!("{e:#}"))?;
        Ok(Runner {
            plan,
            inputs,
            output_names,
            notes,
        })
    }

    /// Runs one batch; `inputs` in the order of [`Runner::inputs`], as f32 arrays or typed
    /// [`Feed`](super::Feed)s (cast to each input's declared type; a feed of that type already
    /// passes as is). Outputs in the order of [`Runner::output_names`], cast to f32.
    pub fn run<I: RunInput>(&self, inputs: &[I]) -> Result<Vec<ArrayD<f32>>> {
        guard_tract(|| self.run_unguarded(inputs))
    }

    fn run_unguarded<I: RunInput>(&self, inputs: &[I]) -> Result<Vec<ArrayD<f32>>> {
        let out = self.run_raw(inputs)?;
        out.into_iter()
            .zip(&self.output_names)
            .map(|(v, name)| {
                let t = v.into_tensor();
                // Already f32 (nearly always): no cast, and no second copy from Cow::into_owned.
                let t = if t.datum_type() == DatumType::F32 {
                    t
                } else {
                    t.cast_to::<f32>()
                        .map_err(|e| anyhow!("{e:#}"))
                        .with_context(|| format!("output '{name}' cannot be read as f32"))?
                        .into_owned()
                };
                t.into_plain_array::<f32>().map_err(|e| anyhow!("{e:#}"))
            })
            .collect()
    }

    /// [`Runner::run`], with each output left in tract's own f32 tensor instead of copied into
    /// an ndarray (calibration reads every activation once: the copy was a second write and
    /// read of each).
    pub fn run_values<I: RunInput>(&self, inputs: &[I]) -> Result<Vec<F32Value>> {
        guard_tract(|| {
            let out = self.run_raw(inputs)?;
            out.into_iter()
                .zip(&self.output_names)
                .map(|(v, name)| {
                    let plain_f32 = v.datum_type() == DatumType::F32
                        && v.to_plain_array_view::<f32>()
                            .is_ok_and(|a| a.is_standard_layout());
                    if plain_f32 {
                        return Ok(F32Value(v));
                    }
                    let t = v
                        .cast_to::<f32>()
                        .map_err(|e| anyhow!("{e:#}"))
                        .with_context(|| format!("output '{name}' cannot be read as f32"))?
                        .into_owned();
                    let a = t.into_plain_array::<f32>().map_err(|e| anyhow!("{e:#}"))?;
                    Ok(F32Value(
                        a.as_standard_layout().into_owned().into_tensor().into(),
                    ))
                })
                .collect()
        })
    }

    fn run_raw<I: RunInput>(&self, inputs: &[I]) -> Result<TVec<TValue>> {
        ensure!(
            inputs.len() == self.inputs.len(),
            "model takes {} inputs, got {}",
            self.inputs.len(),
            inputs.len()
        );
        let mut tv: TVec<_> = TVec::new();
        for (arr, spec) in inputs.iter().zip(&self.inputs) {
            ensure!(
                arr.shape() == spec.shape.as_slice(),
                "input '{}' has shape {:?}, the runner was built for {:?}",
                spec.name,
                arr.shape(),
                spec.shape
            );
            let t = arr.to_tensor();
            let t = t
                .cast_to_dt(datum_type(spec.elem_type)?)
                .map_err(|e| anyhow!("{e:#}"))
                .with_context(|| format!("casting input '{}'", spec.name))?
                .into_owned();
            tv.push(t.into());
        }
        self.plan
            .run(tv)
            .map_err(|e| anyhow!("{e:#}"))
            .context("tract run failed")
    }

    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// What was assumed while building (symbolic dims set to 1, ...).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// One output of [`Runner::run_values`]: an f32 tensor in standard layout, held as tract
/// returned it.
#[derive(Debug, Clone)]
pub struct F32Value(TValue);

impl F32Value {
    /// The values in row-major order.
    pub fn as_slice(&self) -> &[f32] {
        // `run_values` only makes an `F32Value` of a plain f32 tensor in standard layout.
        self.0
            .to_plain_array_view::<f32>()
            .ok()
            .and_then(|a| a.to_slice())
            .unwrap_or(&[])
    }

    pub fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    /// A copy as an ndarray.
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        self.0
            .to_plain_array_view::<f32>()
            .map(|a| a.to_owned())
            .map_err(|e| anyhow!("{e:#}"))
    }
}

/// One-shot run: inputs by name (every model input must be given; shapes taken from the arrays),
/// returns `(name, value)` for the graph outputs then `extra_outputs`.
pub fn run_model<I: RunInput + Clone>(
    model: &ModelProto,
    inputs: &[(String, I)],
    extra_outputs: &[String],
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let shapes: Vec<(String, Vec<usize>)> = inputs
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec()))
        .collect();
    let runner = Runner::new(model, &shapes, extra_outputs)?;
    let ordered = runner
        .inputs()
        .iter()
        .map(|spec| {
            inputs
                .iter()
                .find(|(n, _)| n == &spec.name)
                .map(|(_, a)| a.clone())
                .with_context(|| format!("no value given for input '{}'", spec.name))
        })
        .collect::<Result<Vec<_>>>()?;
    let out = runner.run(&ordered)?;
    Ok(runner.output_names().iter().cloned().zip(out).collect())
}

/// A shape whose dims may be unknown.
type Shape = Vec<Option<usize>>;

/// Type and shape tract infers for one ONNX value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueShape {
    pub name: String,
    /// `None` when tract could not tell.
    pub elem_type: Option<DataType>,
    /// `None` when even the rank is unknown; `Some(None)` entries are unknown dims.
    pub shape: Option<Vec<Option<usize>>>,
}

/// Types and shapes of the graph inputs and of every node output of the top-level graph (in
/// graph order), from tract's analysis with the inputs pinned as in [`resolve_input_shapes`].
///
/// Best effort: tract's typed translation is used when it succeeds (complete facts); otherwise
/// the obstinate inference analysis (partial facts). Values inside subgraphs and initializers are
/// not listed (initializer shapes are in the proto). Outputs of nodes tract folds into
/// constants are still reported, from the folded constant.
pub fn infer_value_shapes(
    model: &ModelProto,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Vec<ValueShape>> {
    let _deadline = crate::limits::watch::start(
        "tract's analysis of the model",
        crate::limits::watch::analysis_budget(model.encoded_len() as u64),
    );
    guard_tract(|| infer_value_shapes_unguarded(model, input_shapes))
}

fn infer_value_shapes_unguarded(
    model: &ModelProto,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Vec<ValueShape>> {
    // Shapes only: the large weights go in as inputs, not copied into tract.
    let light = super::weightless::shape_analysis_copy(model);
    let model = light.as_ref().map_or(model, |l| &l.model);
    let (specs, _) = resolve_input_shapes(model, input_shapes)?;
    let mut im = load(model)?;
    pin_inputs(&mut im, &specs)?;
    let graph = model.graph.as_ref().context("model has no graph")?;
    let mut known: HashMap<String, (Option<DataType>, Option<Shape>)> = HashMap::new();
    let typed = im.clone().into_typed();
    match typed {
        Ok(tm) => {
            for node in tm.nodes() {
                for (ix, out) in node.outputs.iter().enumerate() {
                    let Some(label) = tm.outlet_label(OutletId::new(node.id, ix)) else {
                        continue;
                    };
                    let shape = out
                        .fact
                        .shape
                        .iter()
                        .map(|d| d.to_i64().ok().map(|v| v as usize))
                        .collect();
                    known.insert(
                        label.to_string(),
                        (onnx_code(out.fact.datum_type), Some(shape)),
                    );
                }
            }
        }
        Err(_) => {
            let _ = im.analyse(true);
            for node in im.nodes() {
                for (ix, out) in node.outputs.iter().enumerate() {
                    let Some(label) = im.outlet_label(OutletId::new(node.id, ix)) else {
                        continue;
                    };
                    let dt = out.fact.datum_type.concretize().and_then(onnx_code);
                    let shape = (!out.fact.shape.is_open()).then(|| {
                        out.fact
                            .shape
                            .dims()
                            .map(|d| {
                                d.concretize()
                                    .and_then(|d| d.to_i64().ok())
                                    .map(|v| v as usize)
                            })
                            .collect()
                    });
                    known.insert(label.to_string(), (dt, shape));
                }
            }
        }
    }
    let mut out: Vec<ValueShape> = specs
        .iter()
        .filter(|s| !light.as_ref().is_some_and(|l| l.lifted.contains(&s.name)))
        .map(|s| ValueShape {
            name: s.name.clone(),
            elem_type: DataType::try_from(s.elem_type).ok(),
            shape: Some(s.shape.iter().map(|&d| Some(d)).collect()),
        })
        .collect();
    for node in &graph.node {
        for name in node.output.iter().filter(|o| !o.is_empty()) {
            let (elem_type, shape) = known.get(name).cloned().unwrap_or((None, None));
            out.push(ValueShape {
                name: name.clone(),
                elem_type,
                shape,
            });
        }
    }
    Ok(out)
}
