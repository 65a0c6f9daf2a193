//! The printer. Output is a pure function of the proto and the options: fields are visited
//! in proto order, numbers use Rust's shortest round-trip formatting, nothing depends on
//! hash order or the locale.

use super::{
    crc32, dtype_name, element_count, is_identifier, is_reserved, tensor_bytes, unpack_bits, Kind,
    PrintOptions,
};
use crate::onnx::proto::{
    self, attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto,
    type_proto,
};
use std::fmt::Write;

const STEP: usize = 3;

/// Prints a model: the `<...>` header, the main graph, then the model-local functions.
pub fn print_model(m: &proto::ModelProto, opts: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        opts,
    };
    p.model(m);
    p.out
}

/// Prints a graph on its own (`name (inputs) => (outputs) <initializers> { nodes }`).
pub fn print_graph(g: &proto::GraphProto, opts: &PrintOptions) -> String {
    let mut p = Printer {
        out: String::new(),
        opts,
    };
    p.graph(g, 0);
    p.out.push('\n');
    p.out
}

struct Printer<'o> {
    out: String,
    opts: &'o PrintOptions,
}

/// A name, bare when it is an identifier the parser reads as a name, quoted otherwise.
fn id(s: &str) -> String {
    if is_identifier(s) && !is_reserved(s) {
        s.to_string()
    } else {
        quoted(s.as_bytes())
    }
}

/// A string literal: `\` and `"` are backslash-escaped (as onnx does); bytes that are not
/// UTF-8 and control characters other than newline and tab are written `\xHH` (our
/// extension; onnx's parser would read `\x` as `x`).
fn quoted(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c == '"' {
                s.push('\\');
            }
            if c.is_ascii_control() && c != '\n' && c != '\t' {
                let _ = write!(s, "\\x{:02x}", c as u32);
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s.push('"');
    s
}

fn fmt_f32(v: f32) -> String {
    format!("{v:?}")
}

fn fmt_f64(v: f64) -> String {
    format!("{v:?}")
}

/// Shortest decimal that reads back (through `from_f64`, as the parser does) to the same
/// 16-bit float; falls back to the exact f32 value.
fn fmt_half(as_f32: f32, bits: u16, from_f64: impl Fn(f64) -> u16) -> String {
    if as_f32.is_finite() {
        for digits in 0..9 {
            let cand = format!("{as_f32:.digits$e}");
            if let Ok(v) = cand.parse::<f32>() {
                let s = format!("{v:?}");
                if s.parse::<f64>().is_ok_and(|x| from_f64(x) == bits) {
                    return s;
                }
            }
        }
    }
    fmt_f32(as_f32)
}

/// About four significant digits, trailing zeros trimmed; for summaries only.
fn g4(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    let s = if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:.decimals$}")
    } else {
        return format!("{x:.3e}");
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn le<const N: usize>(bytes: &[u8], i: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = bytes.get(i * N..(i + 1) * N) {
        a.copy_from_slice(s);
    }
    a
}

/// Element `i` as text; `bytes` has been checked to hold all elements.
fn fmt_elem(kind: Kind, bytes: &[u8], i: usize) -> String {
    match kind {
        Kind::F32 => fmt_f32(f32::from_le_bytes(le(bytes, i))),
        Kind::F64 => fmt_f64(f64::from_le_bytes(le(bytes, i))),
        Kind::C64 => format!(
            "{}, {}",
            fmt_f32(f32::from_le_bytes(le(bytes, 2 * i))),
            fmt_f32(f32::from_le_bytes(le(bytes, 2 * i + 1)))
        ),
        Kind::C128 => format!(
            "{}, {}",
            fmt_f64(f64::from_le_bytes(le(bytes, 2 * i))),
            fmt_f64(f64::from_le_bytes(le(bytes, 2 * i + 1)))
        ),
        Kind::F16 => {
            let bits = u16::from_le_bytes(le(bytes, i));
            fmt_half(half::f16::from_bits(bits).to_f32(), bits, |x| {
                half::f16::from_f64(x).to_bits()
            })
        }
        Kind::Bf16 => {
            let bits = u16::from_le_bytes(le(bytes, i));
            fmt_half(half::bf16::from_bits(bits).to_f32(), bits, |x| {
                half::bf16::from_f64(x).to_bits()
            })
        }
        Kind::I8 => (bytes[i] as i8).to_string(),
        Kind::U8 | Kind::Bool | Kind::Code8 => bytes[i].to_string(),
        Kind::I16 => i16::from_le_bytes(le(bytes, i)).to_string(),
        Kind::U16 => u16::from_le_bytes(le(bytes, i)).to_string(),
        Kind::I32 => i32::from_le_bytes(le(bytes, i)).to_string(),
        Kind::U32 => u32::from_le_bytes(le(bytes, i)).to_string(),
        Kind::I64 => i64::from_le_bytes(le(bytes, i)).to_string(),
        Kind::U64 => u64::from_le_bytes(le(bytes, i)).to_string(),
        Kind::Sub { bits, signed } => {
            let code = unpack_bits(bytes, i, bits) as i32;
            let v = if signed && code >= 1 << (bits - 1) {
                code - (1 << bits)
            } else {
                code
            };
            v.to_string()
        }
        Kind::Str => String::new(),
    }
}

/// Element `i` as a number for summary statistics (None where that is meaningless).
fn elem_f64(kind: Kind, bytes: &[u8], i: usize) -> Option<f64> {
    Some(match kind {
        Kind::F32 => f32::from_le_bytes(le(bytes, i)) as f64,
        Kind::F64 => f64::from_le_bytes(le(bytes, i)),
        Kind::F16 => half::f16::from_bits(u16::from_le_bytes(le(bytes, i))).to_f64(),
        Kind::Bf16 => half::bf16::from_bits(u16::from_le_bytes(le(bytes, i))).to_f64(),
        Kind::I8 => bytes[i] as i8 as f64,
        Kind::U8 | Kind::Bool => bytes[i] as f64,
        Kind::I16 => i16::from_le_bytes(le(bytes, i)) as f64,
        Kind::U16 => u16::from_le_bytes(le(bytes, i)) as f64,
        Kind::I32 => i32::from_le_bytes(le(bytes, i)) as f64,
        Kind::U32 => u32::from_le_bytes(le(bytes, i)) as f64,
        Kind::I64 => i64::from_le_bytes(le(bytes, i)) as f64,
        Kind::U64 => u64::from_le_bytes(le(bytes, i)) as f64,
        Kind::Sub { .. } => fmt_elem(kind, bytes, i).parse().ok()?,
        Kind::C64 | Kind::C128 | Kind::Code8 | Kind::Str => return None,
    })
}

/// `{... N values: mean=.. std=.. min=.. max=.. crc32=..}`: never parseable, changes when
/// any byte of the data changes.
fn summary(kind: Kind, bytes: &[u8], n: usize) -> String {
    let mut s = format!("{{... {n} values:");
    let (mut count, mut mean, mut m2) = (0u64, 0f64, 0f64);
    let (mut min, mut max, mut nonfinite) = (f64::INFINITY, f64::NEG_INFINITY, 0usize);
    let mut numeric = true;
    for i in 0..n {
        let Some(v) = elem_f64(kind, bytes, i) else {
            numeric = false;
            break;
        };
        if !v.is_finite() {
            nonfinite += 1;
            continue;
        }
        // Welford: stable and order-deterministic.
        count += 1;
        let d = v - mean;
        mean += d / count as f64;
        m2 += d * (v - mean);
        min = min.min(v);
        max = max.max(v);
    }
    if numeric && count > 0 {
        let std = (m2 / count as f64).sqrt();
        let _ = write!(
            s,
            " mean={} std={} min={} max={}",
            g4(mean),
            g4(std),
            g4(min),
            g4(max)
        );
    }
    if numeric && nonfinite > 0 {
        let _ = write!(s, " nonfinite={nonfinite}");
    }
    let _ = write!(s, " crc32={:08x}}}", crc32(bytes));
    s
}

fn attr_type_name(t: AttributeType) -> &'static str {
    match t {
        AttributeType::Undefined => "undefined",
        AttributeType::Float => "float",
        AttributeType::Int => "int",
        AttributeType::String => "string",
        AttributeType::Tensor => "tensor",
        AttributeType::Graph => "graph",
        AttributeType::SparseTensor => "sparse_tensor",
        AttributeType::TypeProto => "type_proto",
        AttributeType::Floats => "floats",
        AttributeType::Ints => "ints",
        AttributeType::Strings => "strings",
        AttributeType::Tensors => "tensors",
        AttributeType::Graphs => "graphs",
        AttributeType::SparseTensors => "sparse_tensors",
        AttributeType::TypeProtos => "type_protos",
    }
}

/// The attribute's declared type, or the one implied by the field that is set.
fn attr_type(a: &proto::AttributeProto) -> AttributeType {
    use AttributeType as T;
    match a.r#type.and_then(|t| T::try_from(t).ok()) {
        Some(t) if t != T::Undefined => t,
        _ => {
            if a.f.is_some() {
                T::Float
            } else if a.i.is_some() {
                T::Int
            } else if a.s.is_some() {
                T::String
            } else if a.t.is_some() {
                T::Tensor
            } else if a.g.is_some() {
                T::Graph
            } else if a.tp.is_some() {
                T::TypeProto
            } else if !a.floats.is_empty() {
                T::Floats
            } else if !a.ints.is_empty() {
                T::Ints
            } else if !a.strings.is_empty() {
                T::Strings
            } else if !a.tensors.is_empty() {
                T::Tensors
            } else if !a.graphs.is_empty() {
                T::Graphs
            } else if !a.type_protos.is_empty() {
                T::TypeProtos
            } else {
                T::Undefined
            }
        }
    }
}

fn indent(n: usize) -> String {
    " ".repeat(n)
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

fn opsets(o: &[proto::OperatorSetIdProto]) -> String {
    format!(
        "[{}]",
        list(o, |o| format!(
            "{} : {}",
            quoted(o.domain().as_bytes()),
            o.version()
        ))
    )
}

fn string_pairs(kv: &[proto::StringStringEntryProto]) -> String {
    format!(
        "[{}]",
        list(kv, |e| format!(
            "{}: {}",
            quoted(e.key().as_bytes()),
            quoted(e.value().as_bytes())
        ))
    )
}

fn dim(d: &tensor_shape_proto::Dimension) -> String {
    match &d.value {
        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
        Some(tensor_shape_proto::dimension::Value::DimParam(p)) if is_identifier(p) => p.clone(),
        Some(tensor_shape_proto::dimension::Value::DimParam(p)) => quoted(p.as_bytes()),
        None => "?".to_string(),
    }
}

/// `float[2,N]`, `float` (rank 0), `float[]` (unknown rank).
fn tensor_type(elem: i32, shape: Option<&proto::TensorShapeProto>) -> String {
    let name = dtype_name(elem);
    match shape {
        None => format!("{name}[]"),
        Some(s) if s.dim.is_empty() => name.to_string(),
        Some(s) => format!(
            "{name}[{}]",
            s.dim.iter().map(dim).collect::<Vec<_>>().join(",")
        ),
    }
}

fn type_proto(t: &proto::TypeProto) -> String {
    let boxed =
        |t: &Option<Box<proto::TypeProto>>| t.as_deref().map(type_proto).unwrap_or_default();
    match &t.value {
        Some(type_proto::Value::TensorType(tt)) => tensor_type(tt.elem_type(), tt.shape.as_ref()),
        Some(type_proto::Value::SequenceType(s)) => format!("seq({})", boxed(&s.elem_type)),
        Some(type_proto::Value::MapType(m)) => format!(
            "map({}, {})",
            dtype_name(m.key_type()),
            boxed(&m.value_type)
        ),
        Some(type_proto::Value::OptionalType(o)) => format!("optional({})", boxed(&o.elem_type)),
        Some(type_proto::Value::SparseTensorType(s)) => {
            format!(
                "sparse_tensor({})",
                tensor_type(s.elem_type(), s.shape.as_ref())
            )
        }
        Some(type_proto::Value::OpaqueType(o)) => match (o.domain(), o.name()) {
            ("", n) => format!("opaque({n})"),
            (d, n) => format!("opaque({d},{n})"),
        },
        None => String::new(),
    }
}

fn value_info(v: &proto::ValueInfoProto) -> String {
    match v.r#type.as_ref().map(type_proto) {
        Some(t) if !t.is_empty() => format!("{t} {}", id(v.name())),
        _ => id(v.name()),
    }
}

impl Printer<'_> {
    fn model(&mut self, m: &proto::ModelProto) {
        let mut head = Vec::new();
        if let Some(v) = m.ir_version {
            head.push(format!("ir_version: {v}"));
        }
        head.push(format!("opset_import: {}", opsets(&m.opset_import)));
        let strings = [
            ("producer_name", &m.producer_name),
            ("producer_version", &m.producer_version),
            ("domain", &m.domain),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                head.push(format!("{k}: {}", quoted(v.as_bytes())));
            }
        }
        if let Some(v) = m.model_version {
            head.push(format!("model_version: {v}"));
        }
        if let Some(v) = &m.doc_string {
            head.push(format!("doc_string: {}", quoted(v.as_bytes())));
        }
        if !m.metadata_props.is_empty() {
            head.push(format!(
                "metadata_props: {}",
                string_pairs(&m.metadata_props)
            ));
        }
        let _ = writeln!(self.out, "<\n   {}\n>", head.join(",\n   "));
        match &m.graph {
            Some(g) => {
                self.graph(g, 0);
                self.out.push('\n');
            }
            None => self.out.push_str("# (model has no graph)\n"),
        }
        for f in &m.functions {
            self.out.push('\n');
            self.function(f);
        }
    }

    fn function(&mut self, f: &proto::FunctionProto) {
        let mut head = Vec::new();
        if let Some(d) = &f.domain {
            head.push(format!("domain: {}", quoted(d.as_bytes())));
        }
        if let Some(o) = f.overload.as_deref().filter(|o| !o.is_empty()) {
            head.push(format!("overload: {}", quoted(o.as_bytes())));
        }
        if let Some(d) = &f.doc_string {
            head.push(format!("doc_string: {}", quoted(d.as_bytes())));
        }
        head.push(format!("opset_import: {}", opsets(&f.opset_import)));
        let _ = write!(
            self.out,
            "<\n   {}\n>\n{}",
            head.join(",\n   "),
            id(f.name())
        );
        if !f.attribute.is_empty() || !f.attribute_proto.is_empty() {
            let mut attrs: Vec<String> = f.attribute.iter().map(|a| id(a)).collect();
            for a in &f.attribute_proto {
                attrs.push(self.attribute(a, 0));
            }
            let _ = write!(self.out, " <{}>", attrs.join(", "));
        }
        let _ = write!(
            self.out,
            " ({}) => ({})",
            list(&f.input, |s| id(s)),
            list(&f.output, |s| id(s))
        );
        if !f.value_info.is_empty() {
            self.out.push_str("\n<\n");
            let items: Vec<String> = f
                .value_info
                .iter()
                .map(|v| format!("{}{}", indent(STEP), value_info(v)))
                .collect();
            self.out.push_str(&items.join(",\n"));
            self.out.push_str("\n>");
        }
        self.out.push_str("\n{\n");
        for n in &f.node {
            self.node(n, STEP);
        }
        self.out.push_str("}\n");
    }

    /// Prints a graph whose first line continues the current line and whose closing brace
    /// sits at column `ind`.
    fn graph(&mut self, g: &proto::GraphProto, ind: usize) {
        let _ = write!(
            self.out,
            "{} ({}) => ({})",
            id(g.name()),
            list(&g.input, value_info),
            list(&g.output, value_info)
        );
        if !g.initializer.is_empty() || !g.value_info.is_empty() {
            let mut items = Vec::new();
            for t in &g.initializer {
                items.push(format!("{}{}", indent(ind + STEP), self.tensor(t, true)));
            }
            for v in &g.value_info {
                items.push(format!("{}{}", indent(ind + STEP), value_info(v)));
            }
            let _ = write!(
                self.out,
                "\n{0}<\n{1}\n{0}>",
                indent(ind),
                items.join(",\n")
            );
        }
        let _ = writeln!(self.out, "\n{}{{", indent(ind));
        for n in &g.node {
            self.node(n, ind + STEP);
        }
        let _ = write!(self.out, "{}}}", indent(ind));
    }

    fn node(&mut self, n: &proto::NodeProto, ind: usize) {
        let mut line = indent(ind);
        if let Some(name) = &n.name {
            let _ = write!(line, "[{}] ", id(name));
        }
        let _ = write!(line, "{} = ", list(&n.output, |s| id(s)));
        if let Some(d) = n.domain.as_deref().filter(|d| !d.is_empty()) {
            let _ = write!(line, "{d}.");
        }
        line.push_str(n.op_type());
        if let Some(o) = n.overload.as_deref().filter(|o| !o.is_empty()) {
            let _ = write!(line, ":{o}");
        }
        // Like onnx: attributes holding subgraphs go after the inputs.
        let has_subgraph = n
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty());
        let inputs = format!(" ({})", list(&n.input, |s| id(s)));
        if has_subgraph {
            line.push_str(&inputs);
        }
        self.out.push_str(&line);
        if !n.attribute.is_empty() {
            self.out.push_str(" <");
            for (i, a) in n.attribute.iter().enumerate() {
                if i > 0 {
                    self.out.push_str(", ");
                }
                let s = self.attribute(a, ind);
                self.out.push_str(&s);
            }
            self.out.push('>');
        }
        if !has_subgraph {
            self.out.push_str(&inputs);
        }
        self.out.push('\n');
    }

    /// `name: type = value`; nested graphs close at column `ind`.
    fn attribute(&mut self, a: &proto::AttributeProto, ind: usize) -> String {
        let t = attr_type(a);
        let head = format!("{}: {} = ", a.name(), attr_type_name(t));
        if let Some(r) = &a.ref_attr_name {
            return format!("{head}@{}", id(r));
        }
        let value = match t {
            AttributeType::Float => fmt_f32(a.f()),
            AttributeType::Int => a.i().to_string(),
            AttributeType::String => quoted(a.s()),
            AttributeType::Floats => format!("[{}]", list(&a.floats, |v| fmt_f32(*v))),
            AttributeType::Ints => format!("[{}]", list(&a.ints, |v| v.to_string())),
            AttributeType::Strings => format!("[{}]", list(&a.strings, |v| quoted(v))),
            AttributeType::Tensor => match &a.t {
                Some(t) => self.tensor(t, false),
                None => self.tensor(&proto::TensorProto::default(), false),
            },
            AttributeType::Tensors => format!("[{}]", list(&a.tensors, |t| self.tensor(t, false))),
            AttributeType::Graph => match &a.g {
                Some(g) => self.sub_graph(g, ind),
                None => self.sub_graph(&proto::GraphProto::default(), ind),
            },
            AttributeType::Graphs => {
                let gs: Vec<String> = a.graphs.iter().map(|g| self.sub_graph(g, ind)).collect();
                format!("[{}]", gs.join(", "))
            }
            AttributeType::TypeProto => a.tp.as_ref().map(type_proto).unwrap_or_default(),
            AttributeType::TypeProtos => format!("[{}]", list(&a.type_protos, type_proto)),
            AttributeType::SparseTensor
            | AttributeType::SparseTensors
            | AttributeType::Undefined => "{... not representable in text}".to_string(),
        };
        head + &value
    }

    fn sub_graph(&mut self, g: &proto::GraphProto, ind: usize) -> String {
        let mut sub = Printer {
            out: String::new(),
            opts: self.opts,
        };
        sub.graph(g, ind + STEP);
        sub.out
    }

    /// `float[2,3] name = {...}` for initializers, `float[2,3] {...}` (name only when
    /// set) in attributes.
    fn tensor(&self, t: &proto::TensorProto, initializer: bool) -> String {
        let mut s = dtype_name(t.data_type()).to_string();
        if !t.dims.is_empty() {
            let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
            let _ = write!(s, "[{}]", dims.join(","));
        }
        if initializer {
            let _ = write!(s, " {} = ", id(t.name()));
        } else if let Some(name) = t.name.as_deref().filter(|n| !n.is_empty()) {
            let _ = write!(s, " {} ", id(name));
        } else {
            s.push(' ');
        }
        s.push_str(&self.tensor_data(t));
        s
    }

    fn tensor_data(&self, t: &proto::TensorProto) -> String {
        if t.data_location == Some(DataLocation::External as i32) {
            return string_pairs(&t.external_data);
        }
        let Some(kind) = Kind::of(t.data_type()) else {
            return "{... unknown data type}".to_string();
        };
        let Some(n) = element_count(&t.dims) else {
            return "{... invalid dims}".to_string();
        };
        let max = self.opts.max_inline_elements;
        if kind == Kind::Str {
            if t.string_data.len() != n {
                return format!(
                    "{{... invalid: {} strings for {n} elements}}",
                    t.string_data.len()
                );
            }
            if n <= max {
                return format!("{{{}}}", list(&t.string_data, |v| quoted(v)));
            }
            let mut all = Vec::new();
            for v in &t.string_data {
                all.extend((v.len() as u64).to_le_bytes());
                all.extend_from_slice(v);
            }
            return format!("{{... {n} strings crc32={:08x}}}", crc32(&all));
        }
        let bytes = tensor_bytes(t, kind);
        let expected = kind.byte_len(n);
        if expected != Some(bytes.len()) {
            return format!(
                "{{... invalid: {} bytes of data for {n} {} values}}",
                bytes.len(),
                dtype_name(t.data_type())
            );
        }
        if n <= max {
            let vals: Vec<String> = (0..n).map(|i| fmt_elem(kind, &bytes, i)).collect();
            format!("{{{}}}", vals.join(", "))
        } else {
            summary(kind, &bytes, n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_shortest_and_marked() {
        assert_eq!(fmt_f32(1.0), "1.0");
        assert_eq!(fmt_f32(0.1), "0.1");
        assert_eq!(fmt_f32(1e-7), "1e-7");
        assert_eq!(fmt_f32(f32::NEG_INFINITY), "-inf");
    }

    #[test]
    fn half_prints_shortest_that_round_trips() {
        let h = half::f16::from_f32(0.1);
        let s = fmt_half(h.to_f32(), h.to_bits(), |x| {
            half::f16::from_f64(x).to_bits()
        });
        assert_eq!(s, "0.1");
        let h = half::f16::from_f32(1.0);
        let s = fmt_half(h.to_f32(), h.to_bits(), |x| {
            half::f16::from_f64(x).to_bits()
        });
        assert_eq!(s, "1.0");
    }

    #[test]
    fn g4_is_readable() {
        assert_eq!(g4(0.012345), "0.01235");
        assert_eq!(g4(127.0), "127");
        assert_eq!(g4(1.5e-7), "1.500e-7");
        assert_eq!(g4(0.0), "0");
    }

    #[test]
    fn quoting() {
        assert_eq!(id("x"), "x");
        assert_eq!(id("conv.weight"), "\"conv.weight\"");
        assert_eq!(id("float"), "\"float\"");
        assert_eq!(id(""), "\"\"");
        assert_eq!(quoted(b"a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quoted(&[b'a', 0xff]), r#""a\xff""#);
    }
}
