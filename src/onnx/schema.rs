//! Operator schemas of the standard ONNX domains, for checking models at load.
//!
//! The table is `proto/op_schemas.txt`, generated from the pip `onnx` package by
//! `proto/make_op_schemas.py` (its header names the onnx version) and embedded here, parsed
//! once on first use. For each (domain, op, since_version) it holds the input/output arity, the
//! kind of each formal parameter and the attributes with their type and whether they are
//! required, and the element types each input and output formal parameter accepts (type
//! parameters shared between them); it also holds the opset range each domain supports.
//!
//! A node resolves to the schema with the largest `since_version <= ` the model's opset for
//! the node's domain, which is how ONNX itself versions operators. `"ai.onnx"` is an alias of
//! the default domain `""`.

use crate::onnx::proto::attribute_proto::AttributeType;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The generated table (see the module docs).
const TABLE: &str = include_str!("../../proto/op_schemas.txt");

/// How a formal input or output may be filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// Exactly one value, its name not empty.
    Single,
    /// One value or an empty name.
    Optional,
    /// The remaining values (always the last formal parameter).
    Variadic,
}

#[derive(Debug, Clone)]
pub struct AttrSchema {
    pub name: &'static str,
    pub kind: AttributeType,
    pub required: bool,
}

/// One version of one operator.
#[derive(Debug, Clone)]
pub struct OpSchema {
    pub name: &'static str,
    pub since_version: i64,
    /// This version removes the op: a model at this opset or later may not use it.
    pub deprecated: bool,
    /// `(min, max)` number of inputs (`usize::MAX`: unbounded), empty names counted.
    pub inputs: (usize, usize),
    pub outputs: (usize, usize),
    pub input_params: Vec<Param>,
    pub output_params: Vec<Param>,
    pub attributes: Vec<AttrSchema>,
    /// Per input formal parameter: the element types it accepts.
    pub input_types: Vec<ParamTypes>,
    /// Per output formal parameter: the element types it may have (an output sharing an
    /// input's type parameter has that input's type).
    pub output_types: Vec<ParamTypes>,
}

/// The element types one formal parameter accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamTypes {
    /// The schema's type parameter (`T`, `T1`...): inputs sharing one share an element type.
    /// `None` for a fixed type, and for a heterogeneous variadic (Loop's carried values).
    pub type_param: Option<&'static str>,
    /// Accepted `TensorProto.DataType` codes; `None` when non-tensor types are accepted too.
    pub allowed: Option<Vec<i32>>,
}

impl OpSchema {
    pub fn attribute(&self, name: &str) -> Option<&AttrSchema> {
        self.attributes.iter().find(|a| a.name == name)
    }
}

/// What the table says about an op at an opset.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a OpSchema),
    /// The op exists, but only from a later opset.
    NotYet {
        since_version: i64,
    },
    /// The op was deprecated (removed) at or before this opset.
    Removed {
        since_version: i64,
    },
    /// The domain has no op of that name.
    Unknown,
}

#[derive(Debug, Default)]
pub struct Schemas {
    /// The onnx package version the table was generated from.
    pub onnx_version: &'static str,
    opsets: HashMap<&'static str, (i64, i64)>,
    /// Versions of each op by domain and name, ascending `since_version`.
    ops: HashMap<&'static str, HashMap<&'static str, Vec<OpSchema>>>,
}

/// `""` for the default domain under either of its names, else the domain itself.
pub fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}

/// The domain as users read it in messages.
pub fn domain_display(domain: &str) -> String {
    match canonical_domain(domain) {
        "" => "'' (ai.onnx)".to_string(),
        d => format!("'{d}'"),
    }
}

/// The embedded table, parsed on first use.
pub fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    // The table is committed data checked by this module's tests, not user input.
    SCHEMAS.get_or_init(|| parse(TABLE).expect("proto/op_schemas.txt is malformed"))
}

impl Schemas {
    /// The opset range the tool supports for a domain it has schemas for.
    pub fn opset_range(&self, domain: &str) -> Option<(i64, i64)> {
        self.opsets.get(canonical_domain(domain)).copied()
    }

    /// Whether nodes of this domain are checked (custom domains are not).
    pub fn knows_domain(&self, domain: &str) -> bool {
        self.opsets.contains_key(canonical_domain(domain))
    }

    /// Resolve `op` of `domain` at `opset`: the version with the largest `since_version <=
    /// opset`.
    pub fn lookup(&self, domain: &str, op: &str, opset: i64) -> Lookup<'_> {
        let Some(versions) = self
            .ops
            .get(canonical_domain(domain))
            .and_then(|ops| ops.get(op))
        else {
            return Lookup::Unknown;
        };
        match versions.iter().rev().find(|s| s.since_version <= opset) {
            Some(s) if s.deprecated => Lookup::Removed {
                since_version: s.since_version,
            },
            Some(s) => Lookup::Found(s),
            None => Lookup::NotYet {
                since_version: versions.first().map_or(0, |s| s.since_version),
            },
        }
    }
}

fn parse(text: &'static str) -> Result<Schemas, String> {
    let mut schemas = Schemas::default();
    for (n, line) in text.lines().enumerate() {
        let bad = |what: &str| format!("line {}: {what}: {line}", n + 1);
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(rest) = comment
                .trim()
                .strip_prefix("generated by proto/make_op_schemas.py from onnx ")
            {
                schemas.onnx_version = rest.split(';').next().unwrap_or("").trim();
            }
            continue;
        }
        let fields: Vec<&'static str> = line.split(' ').collect();
        let domain = |f: &'static str| if f == "-" { "" } else { f };
        match fields.as_slice() {
            ["opset", d, lo, hi] => {
                let lo = lo.parse().map_err(|_| bad("opset min"))?;
                let hi = hi.parse().map_err(|_| bad("opset max"))?;
                schemas.opsets.insert(domain(d), (lo, hi));
            }
            ["op", d, name, since, flags, ins, outs, in_params, out_params, attrs @ ..] => {
                let schema = OpSchema {
                    name,
                    since_version: since.parse().map_err(|_| bad("since_version"))?,
                    deprecated: *flags == "d",
                    inputs: parse_arity(ins).ok_or_else(|| bad("input arity"))?,
                    outputs: parse_arity(outs).ok_or_else(|| bad("output arity"))?,
                    input_params: parse_params(in_params).ok_or_else(|| bad("inputs"))?,
                    output_params: parse_params(out_params).ok_or_else(|| bad("outputs"))?,
                    attributes: attrs
                        .iter()
                        .map(|a| parse_attr(a))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad("attribute"))?,
                    input_types: Vec::new(),
                    output_types: Vec::new(),
                };
                let versions = schemas
                    .ops
                    .entry(domain(d))
                    .or_default()
                    .entry(name)
                    .or_default();
                if versions
                    .last()
                    .is_some_and(|v| v.since_version >= schema.since_version)
                {
                    return Err(bad("versions out of order"));
                }
                versions.push(schema);
            }
            [record @ ("types" | "otypes"), d, name, since, params @ ..] => {
                let since: i64 = since.parse().map_err(|_| bad("since_version"))?;
                let schema = schemas
                    .ops
                    .get_mut(domain(d))
                    .and_then(|ops| ops.get_mut(name))
                    .and_then(|versions| versions.last_mut())
                    .filter(|v| v.since_version == since)
                    .ok_or_else(|| bad("types without its op record"))?;
                let types = params
                    .iter()
                    .map(|p| parse_param_types(p))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("parameter types"))?;
                if *record == "types" {
                    schema.input_types = types;
                } else {
                    schema.output_types = types;
                }
            }
            _ => return Err(bad("unknown record")),
        }
    }
    Ok(schemas)
}

/// `T|1,10,16`, `_|7` or `T|*`.
fn parse_param_types(s: &'static str) -> Option<ParamTypes> {
    let (param, codes) = s.split_once('|')?;
    let allowed = if codes == "*" {
        None
    } else {
        Some(
            codes
                .split(',')
                .map(|c| c.parse().ok())
                .collect::<Option<Vec<i32>>>()?,
        )
    };
    Some(ParamTypes {
        type_param: (param != "_").then_some(param),
        allowed,
    })
}

fn parse_arity(s: &str) -> Option<(usize, usize)> {
    let (lo, hi) = s.split_once(':')?;
    let hi = if hi == "*" {
        usize::MAX
    } else {
        hi.parse().ok()?
    };
    Some((lo.parse().ok()?, hi))
}

fn parse_params(s: &str) -> Option<Vec<Param>> {
    if s == "-" {
        return Some(Vec::new());
    }
    s.chars()
        .map(|c| match c {
            's' => Some(Param::Single),
            'o' => Some(Param::Optional),
            'v' => Some(Param::Variadic),
            _ => None,
        })
        .collect()
}

fn parse_attr(s: &'static str) -> Option<AttrSchema> {
    let (name, kind) = s.split_once(':')?;
    let (kind, required) = match kind.strip_suffix('!') {
        Some(k) => (k, true),
        None => (kind, false),
    };
    Some(AttrSchema {
        name,
        kind: AttributeType::from_str_name(kind)?,
        required,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_and_knows_the_default_domain() {
        let s = schemas();
        assert_eq!(s.onnx_version, "1.23.2");
        assert_eq!(s.opset_range(""), Some((1, 28)));
        assert_eq!(s.opset_range("ai.onnx"), Some((1, 28)));
        assert_eq!(s.opset_range("ai.onnx.ml"), Some((1, 5)));
        assert_eq!(s.opset_range("com.microsoft"), None);
    }

    #[test]
    fn lookup_takes_the_newest_version_at_or_below_the_opset() {
        let s = schemas();
        let Lookup::Found(cast) = s.lookup("", "Cast", 17) else {
            panic!("Cast at 17")
        };
        assert_eq!(cast.since_version, 13);
        assert!(cast.attribute("to").unwrap().required);
        assert_eq!(cast.attribute("to").unwrap().kind, AttributeType::Int);
        let Lookup::Found(cast1) = s.lookup("ai.onnx", "Cast", 5) else {
            panic!("Cast at 5")
        };
        assert_eq!(cast1.attribute("to").unwrap().kind, AttributeType::String);
        assert!(matches!(
            s.lookup("", "Gelu", 17),
            Lookup::NotYet { since_version: 20 }
        ));
        assert!(matches!(
            s.lookup("", "Upsample", 11),
            Lookup::Removed { since_version: 10 }
        ));
        assert!(matches!(s.lookup("", "NoSuchOp", 17), Lookup::Unknown));
        let Lookup::Found(conv) = s.lookup("", "Conv", 17) else {
            panic!("Conv")
        };
        assert_eq!(conv.inputs, (2, 3));
        assert_eq!(
            conv.input_params,
            [Param::Single, Param::Single, Param::Optional]
        );
        let Lookup::Found(concat) = s.lookup("", "Concat", 13) else {
            panic!("Concat")
        };
        assert_eq!(concat.inputs, (1, usize::MAX));
    }
}
