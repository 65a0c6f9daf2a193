//! ONNX textual syntax: a deterministic printer and a parser working directly on the prost
//! protobuf types (no IR in between).
//!
//! The grammar is the one of `onnx.parser.parse_model` / `onnx.printer.to_text`
//! (onnx/defs/parser.cc, printer.cc):
//!
//! ```text
//! <
//!    ir_version: 8,
//!    opset_import: ["" : 17, "com.microsoft" : 1],
//!    producer_name: "x"
//! >
//! g (float[1,3,8,8] x, float[N,4] y) => (float[1,4,8,8] out)
//! <
//!    float[4,3,3,3] w = {... 108 values: mean=..., crc32=1a2b3c4d},
//!    float[4] b = {0.0, 0.0, 0.0, 0.0},
//!    float[1,4,8,8] c
//! >
//! {
//!    c = Conv <kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]> (x, w, b)
//!    [named_node] out = Relu (c)
//!    z = com.microsoft.Foo (c, "", b)
//! }
//! <domain: "local", opset_import: ["" : 17]>
//! f <alpha> (x) => (y) { y = Relu (x) }
//! ```
//!
//! Lines starting with `#` are comments (fixtures carry `# passes: ...` headers).
//!
//! # Canonical form chosen by the parser
//! The text cannot say *how* a proto stored something, so the parser picks one form, and
//! `parse(print(m)) == m` holds for models already in that form (see [`canonicalize_model`]):
//! - tensor data (initializers, tensor attributes) is stored in `raw_data`, little-endian,
//!   sub-byte types (int4/uint4/int2/uint2/float4/float6) packed LSB-first; strings in
//!   `string_data`. (onnx's own parser fills the typed fields `float_data`, `int32_data`, ...;
//!   real exporters write `raw_data`, and so do our passes.)
//! - optional strings the syntax always prints (graph name, node domain, node name when
//!   absent) are `None` when empty; header keywords present in the text are `Some`.
//! - every attribute gets its `type` set.
//!
//! # Extensions and differences with onnx's printer
//! - float16 / bfloat16 values print as decoded numbers with a decimal point (`1.5`), which
//!   our parser reads as values; integer literals are read as bit patterns like onnx does.
//!   onnx's parser rejects the decoded form, so fp16 tensors are not onnx-parseable.
//! - tensors with more than [`PrintOptions::max_inline_elements`] values are summarised as
//!   `{... N values: mean=.. std=.. min=.. max=.., crc32=xxxxxxxx}`, which no parser accepts.
//! - lists of tensors / graphs in attributes parse (onnx's parser drops them).
//! - non-UTF-8 bytes in strings print as `\xHH`, which our parser decodes.
//!
//! # Not representable (dropped by the printer)
//! doc_string of graphs / nodes / attributes / tensors / value infos, metadata_props other
//! than the model's, value-info denotations, quantization_annotation, sparse initializers and
//! sparse tensor attributes, training_info, device configurations, tensor segments.

mod parse;
mod print;

pub use parse::{parse_graph, parse_model};
pub use print::{print_graph, print_model};

use super::proto::{self, tensor_proto::DataType};
use std::borrow::Cow;

/// Printer settings.
#[derive(Clone, Debug)]
pub struct PrintOptions {
    /// Tensors with at most this many elements are printed with all their values; larger
    /// ones are summarised (count, statistics, CRC-32 of the little-endian bytes).
    pub max_inline_elements: usize,
}

impl Default for PrintOptions {
    fn default() -> Self {
        PrintOptions {
            max_inline_elements: 16,
        }
    }
}

/// Element types by their textual name, as in onnx's `PrimitiveTypeNameMap`.
const DTYPE_NAMES: &[(&str, DataType)] = &[
    ("float", DataType::Float),
    ("uint8", DataType::Uint8),
    ("int8", DataType::Int8),
    ("uint16", DataType::Uint16),
    ("int16", DataType::Int16),
    ("int32", DataType::Int32),
    ("int64", DataType::Int64),
    ("string", DataType::String),
    ("bool", DataType::Bool),
    ("float16", DataType::Float16),
    ("double", DataType::Double),
    ("uint32", DataType::Uint32),
    ("uint64", DataType::Uint64),
    ("complex64", DataType::Complex64),
    ("complex128", DataType::Complex128),
    ("bfloat16", DataType::Bfloat16),
    ("float8e4m3fn", DataType::Float8e4m3fn),
    ("float8e4m3fnuz", DataType::Float8e4m3fnuz),
    ("float8e5m2", DataType::Float8e5m2),
    ("float8e5m2fnuz", DataType::Float8e5m2fnuz),
    ("float8e8m0", DataType::Float8e8m0),
    ("uint4", DataType::Uint4),
    ("int4", DataType::Int4),
    ("float4e2m1", DataType::Float4e2m1),
    ("uint2", DataType::Uint2),
    ("int2", DataType::Int2),
    ("float6e2m3", DataType::Float6e2m3),
    ("float6e3m2", DataType::Float6e3m2),
];

/// Keywords that start a non-tensor type.
const TYPE_KEYWORDS: &[&str] = &["seq", "map", "optional", "sparse_tensor", "opaque"];

fn dtype_name(code: i32) -> &'static str {
    DTYPE_NAMES
        .iter()
        .find(|(_, d)| *d as i32 == code)
        .map_or("undefined", |(n, _)| n)
}

fn dtype_from_name(name: &str) -> Option<DataType> {
    DTYPE_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
}

/// How one element of a data type is laid out in `raw_data` and shown in text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F32,
    F64,
    /// complex64: two f32 per element, printed as a flat list of floats (like onnx).
    C64,
    C128,
    F16,
    Bf16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    /// 8-bit float formats: shown as their raw byte code (like onnx).
    Code8,
    /// Packed sub-byte element (2, 4 or 6 bits, LSB first); float4/float6 show raw codes.
    Sub {
        bits: u32,
        signed: bool,
    },
    Str,
}

impl Kind {
    fn of(code: i32) -> Option<Kind> {
        use DataType as D;
        Some(match DataType::try_from(code).ok()? {
            D::Float => Kind::F32,
            D::Double => Kind::F64,
            D::Complex64 => Kind::C64,
            D::Complex128 => Kind::C128,
            D::Float16 => Kind::F16,
            D::Bfloat16 => Kind::Bf16,
            D::Int8 => Kind::I8,
            D::Int16 => Kind::I16,
            D::Int32 => Kind::I32,
            D::Int64 => Kind::I64,
            D::Uint8 => Kind::U8,
            D::Uint16 => Kind::U16,
            D::Uint32 => Kind::U32,
            D::Uint64 => Kind::U64,
            D::Bool => Kind::Bool,
            D::Float8e4m3fn
            | D::Float8e4m3fnuz
            | D::Float8e5m2
            | D::Float8e5m2fnuz
            | D::Float8e8m0 => Kind::Code8,
            D::Int4 => Kind::Sub {
                bits: 4,
                signed: true,
            },
            D::Uint4 | D::Float4e2m1 => Kind::Sub {
                bits: 4,
                signed: false,
            },
            D::Int2 => Kind::Sub {
                bits: 2,
                signed: true,
            },
            D::Uint2 => Kind::Sub {
                bits: 2,
                signed: false,
            },
            D::Float6e2m3 | D::Float6e3m2 => Kind::Sub {
                bits: 6,
                signed: false,
            },
            D::String => Kind::Str,
            D::Undefined => return None,
        })
    }

    /// Bytes per element for byte-aligned kinds.
    fn size(self) -> usize {
        match self {
            Kind::I8 | Kind::U8 | Kind::Bool | Kind::Code8 => 1,
            Kind::F16 | Kind::Bf16 | Kind::I16 | Kind::U16 => 2,
            Kind::F32 | Kind::I32 | Kind::U32 => 4,
            Kind::F64 | Kind::I64 | Kind::U64 | Kind::C64 => 8,
            Kind::C128 => 16,
            Kind::Sub { .. } | Kind::Str => 0,
        }
    }

    /// Length in bytes of `n` elements in `raw_data`.
    fn byte_len(self, n: usize) -> Option<usize> {
        match self {
            Kind::Sub { bits, .. } => n.checked_mul(bits as usize).map(|b| b.div_ceil(8)),
            Kind::Str => None,
            k => n.checked_mul(k.size()),
        }
    }
}

/// Number of elements of a tensor from its dims (None on negative dims or overflow).
fn element_count(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

/// Reads the `bits`-wide element `i` of an LSB-first packed bit stream.
fn unpack_bits(bytes: &[u8], i: usize, bits: u32) -> u8 {
    let mut v = 0u8;
    for b in 0..bits as usize {
        let bit = i * bits as usize + b;
        if bytes
            .get(bit / 8)
            .is_some_and(|byte| byte >> (bit % 8) & 1 == 1)
        {
            v |= 1 << b;
        }
    }
    v
}

/// Packs `bits`-wide codes LSB-first into bytes.
fn pack_bits(codes: &[u8], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    for (i, &c) in codes.iter().enumerate() {
        for b in 0..bits as usize {
            if c >> b & 1 == 1 {
                let bit = i * bits as usize + b;
                out[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    out
}

/// The little-endian `raw_data` form of a (non-string, non-external) tensor's contents,
/// whichever field holds them.
fn tensor_bytes(t: &proto::TensorProto, kind: Kind) -> Cow<'_, [u8]> {
    if let Some(raw) = &t.raw_data {
        let typed_empty = t.float_data.is_empty()
            && t.double_data.is_empty()
            && t.int32_data.is_empty()
            && t.int64_data.is_empty()
            && t.uint64_data.is_empty();
        if !raw.is_empty() || typed_empty {
            return Cow::Borrowed(raw);
        }
    }
    let mut out = Vec::new();
    match kind {
        Kind::F32 | Kind::C64 => t
            .float_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Kind::F64 | Kind::C128 => t
            .double_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Kind::I64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Kind::U64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Kind::U32 => t
            .uint64_data
            .iter()
            .for_each(|&v| out.extend((v as u32).to_le_bytes())),
        Kind::I32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend(v.to_le_bytes())),
        Kind::I16 | Kind::U16 | Kind::F16 | Kind::Bf16 => t
            .int32_data
            .iter()
            .for_each(|&v| out.extend((v as u16).to_le_bytes())),
        // 2- and 4-bit types store one packed byte per int32 (per onnx.proto).
        Kind::I8 | Kind::U8 | Kind::Bool | Kind::Code8 | Kind::Sub { bits: 2 | 4, .. } => {
            out.extend(t.int32_data.iter().map(|&v| v as u8))
        }
        // 6-bit types store one element per int32.
        Kind::Sub { bits, .. } => {
            let codes: Vec<u8> = t.int32_data.iter().map(|&v| v as u8).collect();
            out = pack_bits(&codes, bits);
        }
        Kind::Str => {}
    }
    Cow::Owned(out)
}

/// Rewrites a tensor into the parser's canonical storage: `raw_data` (little-endian) for
/// every non-string type, typed fields cleared, an empty name as `None`. External and string
/// tensors keep their data fields.
pub fn canonicalize_tensor(t: &mut proto::TensorProto) {
    if t.name.as_deref() == Some("") {
        t.name = None;
    }
    if t.data_location == Some(proto::tensor_proto::DataLocation::External as i32) {
        return;
    }
    let Some(kind) = Kind::of(t.data_type()) else {
        return;
    };
    if kind == Kind::Str {
        return;
    }
    let bytes = tensor_bytes(t, kind).into_owned();
    t.raw_data = Some(bytes.into());
    t.float_data.clear();
    t.double_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.uint64_data.clear();
}

fn canonicalize_graph(g: &mut proto::GraphProto) {
    if g.name.as_deref() == Some("") {
        g.name = None;
    }
    g.initializer.iter_mut().for_each(canonicalize_tensor);
    g.node.iter_mut().for_each(canonicalize_node);
}

fn canonicalize_node(n: &mut proto::NodeProto) {
    if n.domain.as_deref() == Some("") {
        n.domain = None;
    }
    for a in &mut n.attribute {
        if let Some(t) = &mut a.t {
            canonicalize_tensor(t);
        }
        a.tensors.iter_mut().for_each(canonicalize_tensor);
        if let Some(g) = &mut a.g {
            canonicalize_graph(g);
        }
        a.graphs.iter_mut().for_each(canonicalize_graph);
    }
}

/// Brings a model into the form [`parse_model`] produces for the same text (tensor data in
/// `raw_data`, empty graph names / node domains as `None`), so that
/// `parse_model(&print_model(m)) == canonicalize_model(m)` for models whose contents the
/// syntax can express and whose tensors are all printed inline.
pub fn canonicalize_model(m: &proto::ModelProto) -> proto::ModelProto {
    let mut m = m.clone();
    if let Some(g) = &mut m.graph {
        canonicalize_graph(g);
    }
    for f in &mut m.functions {
        f.node.iter_mut().for_each(canonicalize_node);
    }
    m
}

/// CRC-32 (IEEE 802.3, as zlib's `crc32`).
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut c = !0u32;
    for &b in bytes {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// True for `[A-Za-z_][A-Za-z0-9_]*`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.bytes();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Words the parser would read as something other than a name at a name position.
fn is_reserved(s: &str) -> bool {
    dtype_from_name(s).is_some()
        || TYPE_KEYWORDS.contains(&s)
        || ["nan", "inf", "infinity"].contains(&s.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        // zlib.crc32(b"123456789") == 0xcbf43926
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn bit_packing_round_trips() {
        let codes = [1u8, 15, 0, 7, 9];
        let packed = pack_bits(&codes, 4);
        assert_eq!(packed, vec![0xf1, 0x70, 0x09]);
        let back: Vec<u8> = (0..5).map(|i| unpack_bits(&packed, i, 4)).collect();
        assert_eq!(back, codes);
        let six = [63u8, 1, 2, 33, 5];
        let packed6 = pack_bits(&six, 6);
        assert_eq!(packed6.len(), 4);
        let back6: Vec<u8> = (0..5).map(|i| unpack_bits(&packed6, i, 6)).collect();
        assert_eq!(back6, six);
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("x_1"));
        assert!(!is_identifier("1x"));
        assert!(!is_identifier("conv.weight"));
        assert!(!is_identifier(""));
        assert!(is_reserved("float") && is_reserved("NaN") && is_reserved("seq"));
        assert!(!is_reserved("x"));
    }
}
