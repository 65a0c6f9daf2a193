//! The parser: hand-written recursive descent over bytes, following onnx/defs/parser.cc
//! (same tokens, same optional-input rules), producing the canonical form described in the
//! module docs. Every error names `line:col`, what was expected and what was found; input is
//! never trusted (no panics, nesting depth bounded).

use super::{dtype_from_name, element_count, pack_bits, Kind, TYPE_KEYWORDS};
use crate::onnx::proto::{
    self, attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto,
    type_proto,
};
use anyhow::{anyhow, Result};

/// Deepest nesting of graphs / types accepted (keeps hostile input off the stack limit).
const MAX_DEPTH: usize = 64;

/// Parses a model in ONNX text syntax: optional `<...>` header, the main graph, then any
/// number of functions.
pub fn parse_model(text: &str) -> Result<proto::ModelProto> {
    let mut p = Parser::new(text);
    let m = p.model()?;
    Ok(m)
}

/// Parses a single graph (`name (inputs) => (outputs) <initializers> { nodes }`).
pub fn parse_graph(text: &str) -> Result<proto::GraphProto> {
    let mut p = Parser::new(text);
    let g = p.graph()?;
    p.skip_ws();
    if p.pos < p.s.len() {
        return Err(p.err("expected end of input after the graph"));
    }
    Ok(g)
}

enum Lit {
    Int(String),
    Float(String),
    Str(Vec<u8>),
}

/// A single attribute value before it is placed into the AttributeProto.
enum Val {
    F(f32),
    I(i64),
    S(Vec<u8>),
    T(proto::TensorProto),
    G(proto::GraphProto),
    Tp(proto::TypeProto),
}

impl Val {
    fn type_name(&self) -> &'static str {
        match self {
            Val::F(_) => "float",
            Val::I(_) => "int",
            Val::S(_) => "string",
            Val::T(_) => "tensor",
            Val::G(_) => "graph",
            Val::Tp(_) => "type_proto",
        }
    }
}

fn attr_type_from_name(s: &str) -> Option<AttributeType> {
    use AttributeType as T;
    Some(match s {
        "float" => T::Float,
        "int" => T::Int,
        "string" => T::String,
        "tensor" => T::Tensor,
        "graph" => T::Graph,
        "sparse_tensor" => T::SparseTensor,
        "type_proto" => T::TypeProto,
        "floats" => T::Floats,
        "ints" => T::Ints,
        "strings" => T::Strings,
        "tensors" => T::Tensors,
        "graphs" => T::Graphs,
        "sparse_tensors" => T::SparseTensors,
        "type_protos" => T::TypeProtos,
        _ => return None,
    })
}

fn singleton(t: AttributeType) -> AttributeType {
    use AttributeType as T;
    match t {
        T::Floats => T::Float,
        T::Ints => T::Int,
        T::Strings => T::String,
        T::Tensors => T::Tensor,
        T::Graphs => T::Graph,
        T::SparseTensors => T::SparseTensor,
        T::TypeProtos => T::TypeProto,
        t => t,
    }
}

fn is_float_word(w: &str) -> bool {
    matches!(w.to_ascii_lowercase().as_str(), "nan" | "inf" | "infinity")
}

struct Parser<'a> {
    text: &'a str,
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            s: text.as_bytes(),
            pos: 0,
            depth: 0,
        }
    }

    // ---- errors -------------------------------------------------------------------------

    /// An error at the current position (after whitespace): `line L:C: msg, found X`, plus
    /// the offending line with a caret.
    fn err(&mut self, msg: impl std::fmt::Display) -> anyhow::Error {
        self.skip_ws();
        let found = self.found();
        self.err_at(self.pos, format!("{msg}, found {found}"))
    }

    fn err_at(&self, pos: usize, msg: impl std::fmt::Display) -> anyhow::Error {
        let pos = pos.min(self.s.len());
        let before = &self.s[..pos];
        let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        let line_end = self.s[pos..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(self.s.len(), |i| pos + i);
        let col = self
            .text
            .get(line_start..pos)
            .map_or(pos - line_start, |s| s.chars().count())
            + 1;
        let src = String::from_utf8_lossy(&self.s[line_start..line_end]);
        anyhow!(
            "ONNX text parse error at line {line}:{col}: {msg}\n{line:>5} | {src}\n      | {}^",
            " ".repeat(col - 1)
        )
    }

    fn found(&self) -> String {
        if self.pos >= self.s.len() {
            return "end of input".into();
        }
        let rest = &self.s[self.pos..];
        let word: Vec<u8> = rest
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
            .take(40)
            .copied()
            .collect();
        if !word.is_empty() {
            return format!("'{}'", String::from_utf8_lossy(&word));
        }
        match self.text.get(self.pos..).and_then(|s| s.chars().next()) {
            Some(c) => format!("'{c}'"),
            None => format!("byte 0x{:02x}", rest[0]),
        }
    }

    fn enter(&mut self, what: &str) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err(format!("{what} nested more than {MAX_DEPTH} levels deep")));
        }
        Ok(())
    }

    // ---- tokens -------------------------------------------------------------------------

    /// Skips whitespace and `#` comments (to end of line).
    fn skip_ws(&mut self) {
        loop {
            while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.pos < self.s.len() && self.s[self.pos] == b'#' {
                while self.pos < self.s.len() && self.s[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else {
                return;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8, context: &str) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("expected '{}' {context}", c as char)))
        }
    }

    fn expect_arrow(&mut self) -> Result<()> {
        self.skip_ws();
        if self.s[self.pos..].starts_with(b"=>") {
            self.pos += 2;
            Ok(())
        } else {
            Err(self.err("expected '=>' between inputs and outputs"))
        }
    }

    fn ident_opt(&mut self) -> Option<&'a str> {
        self.skip_ws();
        let from = self.pos;
        if self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphabetic() || self.s[self.pos] == b'_')
        {
            self.pos += 1;
            while self.pos < self.s.len()
                && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_')
            {
                self.pos += 1;
            }
        }
        // Identifiers are ASCII, so this slice is on char boundaries.
        self.text.get(from..self.pos).filter(|s| !s.is_empty())
    }

    fn peek_ident(&mut self) -> Option<&'a str> {
        let save = self.pos;
        let id = self.ident_opt();
        self.pos = save;
        id
    }

    fn ident(&mut self, what: &str) -> Result<&'a str> {
        match self.ident_opt() {
            Some(id) => Ok(id),
            None => Err(self.err(format!("expected {what}"))),
        }
    }

    /// `"..."`: `\xHH` is a byte, `\c` is `c`.
    fn string_lit(&mut self, what: &str) -> Result<Vec<u8>> {
        if self.peek() != Some(b'"') {
            return Err(self.err(format!("expected {what} (a quoted string)")));
        }
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(self.err_at(start, "unterminated string literal"));
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        return Err(self.err_at(start, "unterminated string literal"));
                    };
                    self.pos += 1;
                    let hex = self.s.get(self.pos..self.pos + 2).and_then(|h| {
                        std::str::from_utf8(h)
                            .ok()
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    });
                    match (e, hex) {
                        (b'x', Some(b)) => {
                            self.pos += 2;
                            out.push(b);
                        }
                        _ => out.push(e),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn utf8(&self, bytes: Vec<u8>, at: usize, what: &str) -> Result<String> {
        String::from_utf8(bytes).map_err(|_| self.err_at(at, format!("{what} is not valid UTF-8")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        self.skip_ws();
        let at = self.pos;
        let b = self.string_lit(what)?;
        self.utf8(b, at, what)
    }

    /// A name: identifier or quoted string.
    fn qid(&mut self, what: &str) -> Result<String> {
        if self.peek() == Some(b'"') {
            self.string(what)
        } else {
            Ok(self.ident(what)?.to_string())
        }
    }

    /// Numeric or string literal, as onnx lexes them: `-`? (digits (`.` digits)? exponent?
    /// | nan | inf | infinity), or `"..."`.
    fn literal(&mut self, what: &str) -> Result<Lit> {
        match self.peek() {
            Some(b'"') => return Ok(Lit::Str(self.string_lit(what)?)),
            None => return Err(self.err(format!("expected {what}"))),
            _ => {}
        }
        let from = self.pos;
        if self.s[self.pos] == b'-' {
            self.pos += 1;
        }
        let at = |p: &Self| p.s.get(p.pos).copied();
        if at(self).is_some_and(|c| c.is_ascii_alphabetic()) {
            let word_start = self.pos;
            while at(self).is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.pos += 1;
            }
            let word = &self.text[word_start..self.pos];
            if is_float_word(word) {
                return Ok(Lit::Float(self.text[from..self.pos].to_string()));
            }
            self.pos = from;
            return Err(self.err(format!("expected {what}")));
        }
        if !at(self).is_some_and(|c| c.is_ascii_digit()) {
            self.pos = from;
            return Err(self.err(format!("expected {what}")));
        }
        let mut float = false;
        while let Some(c) = at(self) {
            if c.is_ascii_digit() {
                self.pos += 1;
            } else if c == b'.' && !float {
                float = true;
                self.pos += 1;
            } else {
                break;
            }
        }
        if matches!(at(self), Some(b'e' | b'E')) {
            float = true;
            self.pos += 1;
            if matches!(at(self), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            while at(self).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        let text = self.text[from..self.pos].to_string();
        Ok(if float {
            Lit::Float(text)
        } else {
            Lit::Int(text)
        })
    }

    fn int_lit(&mut self, what: &str) -> Result<i64> {
        self.skip_ws();
        let at = self.pos;
        match self.literal(what)? {
            Lit::Int(t) => t
                .parse()
                .map_err(|_| self.err_at(at, format!("{what}: integer {t} out of range"))),
            _ => Err(self.err_at(at, format!("expected {what} (an integer)"))),
        }
    }

    // ---- model / function headers -------------------------------------------------------

    fn model(&mut self) -> Result<proto::ModelProto> {
        let mut m = proto::ModelProto::default();
        if self.eat(b'<') {
            while self.peek() != Some(b'>') {
                self.skip_ws();
                let kw_at = self.pos;
                let kw = self.ident("a model header keyword")?;
                self.expect(b':', &format!("after '{kw}'"))?;
                match kw {
                    "ir_version" => m.ir_version = Some(self.int_lit("ir_version")?),
                    "opset_import" => m.opset_import = self.opsets()?,
                    "producer_name" => m.producer_name = Some(self.string("producer_name")?),
                    "producer_version" => {
                        m.producer_version = Some(self.string("producer_version")?)
                    }
                    "domain" => m.domain = Some(self.string("domain")?),
                    "model_version" => m.model_version = Some(self.int_lit("model_version")?),
                    "doc_string" => m.doc_string = Some(self.string("doc_string")?),
                    "metadata_props" => m.metadata_props = self.string_pairs()?,
                    _ => {
                        self.pos = kw_at;
                        return Err(self.err(
                            "expected a model header keyword (ir_version, opset_import, \
                             producer_name, producer_version, domain, model_version, \
                             doc_string, metadata_props)",
                        ));
                    }
                }
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'>', "to close the model header")?;
        }
        m.graph = Some(self.graph()?);
        while !self.at_end() {
            m.functions.push(self.function()?);
        }
        Ok(m)
    }

    fn opsets(&mut self) -> Result<Vec<proto::OperatorSetIdProto>> {
        let mut v = Vec::new();
        self.expect(b'[', "to open the opset list")?;
        if !self.eat(b']') {
            loop {
                let domain = self.string("an opset domain")?;
                self.expect(b':', "between opset domain and version")?;
                let version = self.int_lit("an opset version")?;
                v.push(proto::OperatorSetIdProto {
                    domain: Some(domain),
                    version: Some(version),
                });
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b']', "to close the opset list")?;
        }
        Ok(v)
    }

    fn string_pairs(&mut self) -> Result<Vec<proto::StringStringEntryProto>> {
        let mut v = Vec::new();
        self.expect(b'[', "to open the key/value list")?;
        if !self.eat(b']') {
            loop {
                let key = self.string("a key")?;
                self.expect(b':', "between key and value")?;
                let value = self.string("a value")?;
                v.push(proto::StringStringEntryProto {
                    key: Some(key),
                    value: Some(value),
                });
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b']', "to close the key/value list")?;
        }
        Ok(v)
    }

    fn function(&mut self) -> Result<proto::FunctionProto> {
        let mut f = proto::FunctionProto::default();
        if self.eat(b'<') {
            while self.peek() != Some(b'>') {
                self.skip_ws();
                let kw_at = self.pos;
                let kw = self.ident("a function header keyword")?;
                self.expect(b':', &format!("after '{kw}'"))?;
                match kw {
                    "domain" => f.domain = Some(self.string("domain")?),
                    "overload" => f.overload = Some(self.string("overload")?),
                    "doc_string" => f.doc_string = Some(self.string("doc_string")?),
                    "opset_import" => f.opset_import = self.opsets()?,
                    _ => {
                        self.pos = kw_at;
                        return Err(self.err(
                            "expected a function header keyword (domain, overload, doc_string, \
                             opset_import)",
                        ));
                    }
                }
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'>', "to close the function header")?;
        }
        f.name = Some(self.qid("a function name")?);
        if self.eat(b'<') {
            loop {
                let name = self.qid("an attribute name")?;
                if matches!(self.peek(), Some(b':' | b'=')) {
                    let a = self.attribute(name)?;
                    f.attribute_proto.push(a);
                } else {
                    f.attribute.push(name);
                }
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'>', "to close the function attributes")?;
        }
        f.input = self.function_io(&mut f.value_info, "function inputs")?;
        self.expect_arrow()?;
        f.output = self.function_io(&mut f.value_info, "function outputs")?;
        if self.eat(b'<') && !self.eat(b'>') {
            loop {
                let vi = self.value_info()?;
                f.value_info.push(vi);
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'>', "to close the function value infos")?;
        }
        f.node = self.nodes()?;
        Ok(f)
    }

    /// `(x, float[2] y)`: names, the typed ones also recorded as value infos.
    fn function_io(
        &mut self,
        vis: &mut Vec<proto::ValueInfoProto>,
        what: &str,
    ) -> Result<Vec<String>> {
        let mut names = Vec::new();
        self.expect(b'(', &format!("to open the {what}"))?;
        if !self.eat(b')') {
            loop {
                let vi = self.value_info()?;
                names.push(vi.name().to_string());
                if vi.r#type.is_some() {
                    vis.push(vi);
                }
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b')', &format!("to close the {what}"))?;
        }
        Ok(names)
    }

    // ---- graphs and nodes ---------------------------------------------------------------

    fn graph(&mut self) -> Result<proto::GraphProto> {
        self.enter("graph")?;
        let mut g = proto::GraphProto::default();
        let name = self.qid("a graph name")?;
        g.name = (!name.is_empty()).then_some(name);
        self.expect(b'(', "to open the graph inputs")?;
        if !self.eat(b')') {
            loop {
                let vi = self.value_info()?;
                if self.eat(b'=') {
                    let t = self.tensor_value(vi.r#type.as_ref(), vi.name.clone())?;
                    g.initializer.push(t);
                }
                g.input.push(vi);
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b')', "to close the graph inputs")?;
        }
        self.expect_arrow()?;
        self.expect(b'(', "to open the graph outputs")?;
        if !self.eat(b')') {
            loop {
                g.output.push(self.value_info()?);
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b')', "to close the graph outputs")?;
        }
        if self.eat(b'<') && !self.eat(b'>') {
            loop {
                let vi = self.value_info()?;
                if self.eat(b'=') {
                    let t = self.tensor_value(vi.r#type.as_ref(), vi.name.clone())?;
                    g.initializer.push(t);
                } else {
                    g.value_info.push(vi);
                }
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'>', "to close the initializer / value-info list")?;
        }
        g.node = self.nodes()?;
        self.depth -= 1;
        Ok(g)
    }

    fn nodes(&mut self) -> Result<Vec<proto::NodeProto>> {
        self.expect(b'{', "to open the node list")?;
        let mut nodes = Vec::new();
        while !self.eat(b'}') {
            if self.at_end() {
                return Err(self.err("expected a node or '}' to close the node list"));
            }
            nodes.push(self.node()?);
        }
        Ok(nodes)
    }

    /// Names separated by commas where empty entries are allowed (`""` or nothing before a
    /// comma), as onnx's `IdList`.
    fn id_list(&mut self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        loop {
            let found = if self.peek() == Some(b'"') {
                v.push(self.string("a name")?);
                true
            } else if let Some(id) = self.ident_opt() {
                v.push(id.to_string());
                true
            } else if self.peek() == Some(b',') {
                v.push(String::new());
                true
            } else {
                false
            };
            if !found || !self.eat(b',') {
                break;
            }
        }
        Ok(v)
    }

    fn node(&mut self) -> Result<proto::NodeProto> {
        let mut n = proto::NodeProto::default();
        if self.eat(b'[') {
            n.name = Some(if self.peek() == Some(b'"') {
                self.string("a node name")?
            } else {
                self.ident_opt().unwrap_or_default().to_string()
            });
            self.expect(b']', "to close the node name")?;
        }
        n.output = self.id_list()?;
        self.expect(b'=', "after the node outputs")?;
        let mut op = self.ident("an operator name")?.to_string();
        let mut domain: Vec<String> = Vec::new();
        while self.s.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            domain.push(std::mem::replace(
                &mut op,
                self.ident("an operator name after '.'")?.to_string(),
            ));
        }
        n.domain = (!domain.is_empty()).then(|| domain.join("."));
        n.op_type = Some(op);
        if self.eat(b':') {
            n.overload = Some(self.ident("an overload name")?.to_string());
        }
        if self.peek() == Some(b'<') {
            n.attribute = self.attr_list()?;
        }
        self.expect(b'(', &format!("to open the inputs of {}", n.op_type()))?;
        n.input = self.id_list()?;
        self.expect(b')', &format!("to close the inputs of {}", n.op_type()))?;
        if n.attribute.is_empty() && self.peek() == Some(b'<') {
            n.attribute = self.attr_list()?;
        }
        Ok(n)
    }

    // ---- attributes ---------------------------------------------------------------------

    fn attr_list(&mut self) -> Result<Vec<proto::AttributeProto>> {
        self.expect(b'<', "to open the attributes")?;
        let mut v = Vec::new();
        loop {
            let name = self.ident("an attribute name")?.to_string();
            v.push(self.attribute(name)?);
            if !self.eat(b',') {
                break;
            }
        }
        self.expect(b'>', "to close the attributes")?;
        Ok(v)
    }

    fn attribute(&mut self, name: String) -> Result<proto::AttributeProto> {
        let mut a = proto::AttributeProto {
            name: Some(name),
            ..Default::default()
        };
        let declared = if self.eat(b':') {
            let w = self.ident("an attribute type")?;
            match attr_type_from_name(w) {
                Some(t) => Some(t),
                None => {
                    self.pos -= w.len();
                    return Err(self.err("expected an attribute type (int, float, string, tensor, graph, type_proto, ints, floats, strings, tensors, graphs, type_protos)"));
                }
            }
        } else {
            None
        };
        self.expect(b'=', &format!("after attribute '{}'", a.name()))?;
        if self.eat(b'@') {
            a.ref_attr_name = Some(self.qid("a referenced attribute name")?);
            a.r#type = declared.map(|t| t as i32);
            return Ok(a);
        }
        self.skip_ws();
        let at = self.pos;
        let what = format!("attribute '{}'", a.name());
        if matches!(
            declared,
            Some(AttributeType::SparseTensor | AttributeType::SparseTensors)
        ) {
            return Err(self.err_at(
                at,
                format!("{what}: sparse tensor attributes are not supported"),
            ));
        }
        let t = if self.eat(b'[') {
            let mut vals = Vec::new();
            if !self.eat(b']') {
                loop {
                    vals.push(self.single_value(declared.map(singleton), &what)?);
                    if !self.eat(b',') {
                        break;
                    }
                }
                self.expect(b']', &format!("to close the list of {what}"))?;
            }
            let t = match declared {
                Some(t) if singleton(t) == t => {
                    return Err(
                        self.err_at(at, format!("{what} is declared {t:?} but given a list"))
                    )
                }
                Some(t) => t,
                None => match vals.first() {
                    None => {
                        return Err(self.err_at(
                            at,
                            format!("{what}: an empty list needs a type, e.g. `name: ints = []`"),
                        ))
                    }
                    Some(Val::I(_)) if vals.iter().all(|v| matches!(v, Val::I(_))) => {
                        AttributeType::Ints
                    }
                    Some(Val::I(_) | Val::F(_)) => AttributeType::Floats,
                    Some(Val::S(_)) => AttributeType::Strings,
                    Some(Val::T(_)) => AttributeType::Tensors,
                    Some(Val::G(_)) => AttributeType::Graphs,
                    Some(Val::Tp(_)) => AttributeType::TypeProtos,
                },
            };
            for v in vals {
                match (t, v) {
                    (AttributeType::Ints, Val::I(i)) => a.ints.push(i),
                    (AttributeType::Floats, Val::F(f)) => a.floats.push(f),
                    (AttributeType::Floats, Val::I(i)) => a.floats.push(i as f32),
                    (AttributeType::Strings, Val::S(s)) => a.strings.push(s.into()),
                    (AttributeType::Tensors, Val::T(x)) => a.tensors.push(x),
                    (AttributeType::Graphs, Val::G(g)) => a.graphs.push(g),
                    (AttributeType::TypeProtos, Val::Tp(x)) => a.type_protos.push(x),
                    (t, v) => {
                        return Err(self.err_at(
                            at,
                            format!("{what}: a {} in a list of {t:?}", v.type_name()),
                        ))
                    }
                }
            }
            t
        } else {
            let v = self.single_value(declared, &what)?;
            match v {
                Val::F(f) => {
                    a.f = Some(f);
                    AttributeType::Float
                }
                Val::I(i) => {
                    a.i = Some(i);
                    AttributeType::Int
                }
                Val::S(s) => {
                    a.s = Some(s.into());
                    AttributeType::String
                }
                Val::T(x) => {
                    a.t = Some(x);
                    AttributeType::Tensor
                }
                Val::G(g) => {
                    a.g = Some(g);
                    AttributeType::Graph
                }
                Val::Tp(x) => {
                    a.tp = Some(x);
                    AttributeType::TypeProto
                }
            }
        };
        a.r#type = Some(t as i32);
        Ok(a)
    }

    /// One attribute value; `expected` is the declared (singleton) type if any. An int
    /// where a float is declared becomes a float, as in onnx.
    fn single_value(&mut self, expected: Option<AttributeType>, what: &str) -> Result<Val> {
        self.skip_ws();
        let at = self.pos;
        let c = self.peek();
        let v =
            match c {
                Some(b'"') => {
                    // A quoted name followed by '(' is a graph, otherwise a string.
                    let save = self.pos;
                    let s = self.string_lit(what)?;
                    if expected == Some(AttributeType::Graph) || self.peek() == Some(b'(') {
                        self.pos = save;
                        Val::G(self.graph()?)
                    } else {
                        Val::S(s)
                    }
                }
                Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                    let word = self.peek_ident().unwrap_or_default();
                    if self.next_is_type() {
                        let ty = self.type_proto()?;
                        let next = self.peek();
                        if matches!(next, Some(b'{' | b'=' | b'"' | b'['))
                            || self.peek_ident().is_some()
                        {
                            let name = if self.peek() == Some(b'"') {
                                Some(self.string("a tensor name")?)
                            } else {
                                self.ident_opt().map(str::to_string)
                            };
                            self.eat(b'=');
                            Val::T(self.tensor_value(Some(&ty), name)?)
                        } else {
                            Val::Tp(ty)
                        }
                    } else if is_float_word(word) {
                        match self.literal(what)? {
                            Lit::Float(t) => Val::F(self.parse_f32(&t, at)?),
                            _ => return Err(self.err_at(at, format!("{what}: bad float"))),
                        }
                    } else {
                        Val::G(self.graph()?)
                    }
                }
                Some(b'-' | b'0'..=b'9') => match self.literal(what)? {
                    Lit::Int(t) => Val::I(t.parse().map_err(|_| {
                        self.err_at(at, format!("{what}: integer {t} out of range"))
                    })?),
                    Lit::Float(t) => Val::F(self.parse_f32(&t, at)?),
                    Lit::Str(s) => Val::S(s),
                },
                _ => return Err(self.err(format!("expected a value for {what}"))),
            };
        let v = match (expected, v) {
            (Some(AttributeType::Float), Val::I(i)) => Val::F(i as f32),
            (None, v) => v,
            (Some(e), v) => {
                let got = attr_type_from_name(v.type_name());
                if got != Some(e) {
                    return Err(self.err_at(
                        at,
                        format!(
                            "{what} is declared {e:?} but the value is a {}",
                            v.type_name()
                        ),
                    ));
                }
                v
            }
        };
        Ok(v)
    }

    fn parse_f32(&self, t: &str, at: usize) -> Result<f32> {
        t.to_ascii_lowercase()
            .parse::<f32>()
            .map_err(|_| self.err_at(at, format!("bad float literal {t}")))
    }

    fn parse_f64(&self, t: &str, at: usize) -> Result<f64> {
        t.to_ascii_lowercase()
            .parse::<f64>()
            .map_err(|_| self.err_at(at, format!("bad float literal {t}")))
    }

    // ---- types --------------------------------------------------------------------------

    fn next_is_type(&mut self) -> bool {
        self.peek_ident()
            .is_some_and(|w| dtype_from_name(w).is_some() || TYPE_KEYWORDS.contains(&w))
    }

    fn value_info(&mut self) -> Result<proto::ValueInfoProto> {
        let ty = if self.next_is_type() {
            Some(self.type_proto()?)
        } else {
            None
        };
        let name = self.qid("a value name")?;
        Ok(proto::ValueInfoProto {
            name: Some(name),
            r#type: ty,
            ..Default::default()
        })
    }

    fn elem_type(&mut self, what: &str) -> Result<i32> {
        let w = self.ident(what)?;
        match dtype_from_name(w) {
            Some(d) => Ok(d as i32),
            None => {
                self.pos -= w.len();
                Err(self.err(format!("expected {what} (float, int64, ...)")))
            }
        }
    }

    /// After an element type: `[dims]` (known rank), `[]` (unknown rank) or nothing (scalar).
    fn shape_suffix(&mut self) -> Result<Option<proto::TensorShapeProto>> {
        use tensor_shape_proto::{dimension::Value, Dimension};
        if !self.eat(b'[') {
            return Ok(Some(proto::TensorShapeProto::default()));
        }
        if self.eat(b']') {
            return Ok(None);
        }
        let mut shape = proto::TensorShapeProto::default();
        loop {
            let value = if self.eat(b'?') {
                None
            } else if self.peek() == Some(b'"') {
                Some(Value::DimParam(self.string("a dimension name")?))
            } else if let Some(id) = self.ident_opt() {
                Some(Value::DimParam(id.to_string()))
            } else {
                Some(Value::DimValue(self.int_lit("a dimension")?))
            };
            shape.dim.push(Dimension {
                value,
                denotation: None,
            });
            if !self.eat(b',') {
                break;
            }
        }
        self.expect(b']', "to close the shape")?;
        Ok(Some(shape))
    }

    fn type_proto(&mut self) -> Result<proto::TypeProto> {
        use type_proto::Value;
        self.enter("type")?;
        let w = self.ident("a type")?;
        let value = if let Some(d) = dtype_from_name(w) {
            Value::TensorType(type_proto::Tensor {
                elem_type: Some(d as i32),
                shape: self.shape_suffix()?,
            })
        } else {
            self.expect(b'(', &format!("after '{w}'"))?;
            let v =
                match w {
                    "seq" => Value::SequenceType(Box::new(type_proto::Sequence {
                        elem_type: Some(Box::new(self.type_proto()?)),
                    })),
                    "optional" => Value::OptionalType(Box::new(type_proto::Optional {
                        elem_type: Some(Box::new(self.type_proto()?)),
                    })),
                    "map" => {
                        let key_type = Some(self.elem_type("a map key type")?);
                        self.expect(b',', "after the map key type")?;
                        Value::MapType(Box::new(type_proto::Map {
                            key_type,
                            value_type: Some(Box::new(self.type_proto()?)),
                        }))
                    }
                    "sparse_tensor" => {
                        let elem_type = Some(self.elem_type("a sparse tensor element type")?);
                        Value::SparseTensorType(type_proto::SparseTensor {
                            elem_type,
                            shape: self.shape_suffix()?,
                        })
                    }
                    "opaque" => {
                        let mut o = type_proto::Opaque::default();
                        if self.peek() != Some(b')') {
                            let mut first = self.ident("an opaque type name")?.to_string();
                            while self.eat(b'.') {
                                first.push('.');
                                first.push_str(self.ident("an opaque type name")?);
                            }
                            if self.eat(b',') {
                                o.domain = Some(first);
                                o.name = Some(self.ident("an opaque type name")?.to_string());
                            } else {
                                o.name = Some(first);
                            }
                        }
                        Value::OpaqueType(o)
                    }
                    _ => return Err(self.err(
                        "expected a type (float, int64[2], seq(...), map(...), optional(...), ...)",
                    )),
                };
            self.expect(b')', &format!("to close '{w}('"))?;
            v
        };
        self.depth -= 1;
        Ok(proto::TypeProto {
            value: Some(value),
            denotation: None,
        })
    }

    // ---- tensors ------------------------------------------------------------------------

    /// The data part of a tensor literal (`{...}`, `[external data]` or nothing), given its
    /// declared type.
    fn tensor_value(
        &mut self,
        ty: Option<&proto::TypeProto>,
        name: Option<String>,
    ) -> Result<proto::TensorProto> {
        self.skip_ws();
        let at = self.pos;
        let label = name
            .as_deref()
            .map_or("tensor".to_string(), |n| format!("tensor '{n}'"));
        let Some(type_proto::Value::TensorType(tt)) = ty.and_then(|t| t.value.as_ref()) else {
            return Err(self.err_at(at, format!("{label}: a tensor value needs a tensor type")));
        };
        let Some(shape) = &tt.shape else {
            return Err(self.err_at(
                at,
                format!("{label}: a tensor value needs a known shape, not []"),
            ));
        };
        let mut dims = Vec::new();
        for d in &shape.dim {
            match d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) => dims.push(v),
                _ => {
                    return Err(
                        self.err_at(at, format!("{label}: tensor dimensions must be numbers"))
                    )
                }
            }
        }
        let mut t = proto::TensorProto {
            name,
            data_type: tt.elem_type,
            dims,
            ..Default::default()
        };
        if self.eat(b'[') {
            t.data_location = Some(DataLocation::External as i32);
            self.pos -= 1;
            t.external_data = self.string_pairs()?;
            return Ok(t);
        }
        if self.peek() != Some(b'{') {
            return Ok(t);
        }
        self.pos += 1;
        self.skip_ws();
        if self.s[self.pos..].starts_with(b"...") {
            return Err(self.err_at(
                at,
                format!(
                    "{label} is summarised or invalid (`{{...}}`), its data is not in the text; \
                     print with a larger max_inline_elements to get parseable values"
                ),
            ));
        }
        let Some(kind) = Kind::of(t.data_type()) else {
            return Err(self.err_at(at, format!("{label}: unsupported element type")));
        };
        let Some(n) = element_count(&t.dims) else {
            return Err(self.err_at(at, format!("{label}: invalid dimensions {:?}", t.dims)));
        };
        let mut bytes = Vec::new();
        let mut codes = Vec::new();
        let mut count = 0usize;
        if !self.eat(b'}') {
            loop {
                self.skip_ws();
                let vat = self.pos;
                let lit = self.literal("a tensor value")?;
                self.push_value(kind, lit, vat, &label, &mut t, &mut bytes, &mut codes)?;
                count += 1;
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b'}', &format!("to close the values of {label}"))?;
        }
        let want = if matches!(kind, Kind::C64 | Kind::C128) {
            n.saturating_mul(2)
        } else {
            n
        };
        if count != want {
            return Err(self.err_at(
                at,
                format!(
                    "{label}: {count} values given but shape {:?} holds {want}",
                    t.dims
                ),
            ));
        }
        match kind {
            Kind::Str => {}
            Kind::Sub { bits, .. } => t.raw_data = Some(pack_bits(&codes, bits).into()),
            _ => t.raw_data = Some(bytes.into()),
        }
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_value(
        &self,
        kind: Kind,
        lit: Lit,
        at: usize,
        label: &str,
        t: &mut proto::TensorProto,
        bytes: &mut Vec<u8>,
        codes: &mut Vec<u8>,
    ) -> Result<()> {
        let int = |lo: i128, hi: i128| -> Result<i128> {
            match &lit {
                Lit::Int(s) => match s.parse::<i128>() {
                    Ok(v) if (lo..=hi).contains(&v) => Ok(v),
                    _ => Err(self.err_at(at, format!("{label}: {s} is out of range {lo}..={hi}"))),
                },
                _ => Err(self.err_at(at, format!("{label}: expected an integer value"))),
            }
        };
        fn num_text(lit: &Lit) -> Option<&str> {
            match lit {
                Lit::Int(s) | Lit::Float(s) => Some(s),
                Lit::Str(_) => None,
            }
        }
        let num = |lit: &Lit| -> Result<String> {
            num_text(lit).map(str::to_string).ok_or_else(|| {
                self.err_at(at, format!("{label}: expected a number, found a string"))
            })
        };
        match kind {
            Kind::F32 | Kind::C64 => bytes.extend(self.parse_f32(&num(&lit)?, at)?.to_le_bytes()),
            Kind::F64 | Kind::C128 => bytes.extend(self.parse_f64(&num(&lit)?, at)?.to_le_bytes()),
            Kind::F16 | Kind::Bf16 => {
                let bits = match &lit {
                    // Integers are bit patterns, as in onnx's printer/parser.
                    Lit::Int(_) => int(-32768, 65535)? as u16,
                    _ => {
                        let x = self.parse_f64(&num(&lit)?, at)?;
                        if kind == Kind::F16 {
                            half::f16::from_f64(x).to_bits()
                        } else {
                            half::bf16::from_f64(x).to_bits()
                        }
                    }
                };
                bytes.extend(bits.to_le_bytes());
            }
            Kind::I8 => bytes.push(int(-128, 127)? as i8 as u8),
            Kind::U8 | Kind::Bool | Kind::Code8 => bytes.push(int(0, 255)? as u8),
            Kind::I16 => {
                bytes.extend((int(i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes())
            }
            Kind::U16 => bytes.extend((int(0, u16::MAX.into())? as u16).to_le_bytes()),
            Kind::I32 => {
                bytes.extend((int(i32::MIN.into(), i32::MAX.into())? as i32).to_le_bytes())
            }
            Kind::U32 => bytes.extend((int(0, u32::MAX.into())? as u32).to_le_bytes()),
            Kind::I64 => {
                bytes.extend((int(i64::MIN.into(), i64::MAX.into())? as i64).to_le_bytes())
            }
            Kind::U64 => bytes.extend((int(0, u64::MAX.into())? as u64).to_le_bytes()),
            Kind::Sub { bits, signed } => {
                let (lo, hi) = if signed {
                    (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
                } else {
                    (0, (1i128 << bits) - 1)
                };
                let v = int(lo, hi)?;
                codes.push((v & ((1 << bits) - 1)) as u8);
            }
            Kind::Str => match lit {
                Lit::Str(s) => t.string_data.push(s.into()),
                _ => return Err(self.err_at(at, format!("{label}: expected a string value"))),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_line_and_column() {
        let e = parse_model("<ir_version: 8>\ng (float x) => (float y)\n{\n  y = Relu (x\n}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5:1"), "{e}");
        assert!(e.contains("expected ')'"), "{e}");
    }

    #[test]
    fn empty_inputs_follow_onnx_rules() {
        let g = parse_graph(
            "g (float x) => (float y) { y = Clip (x, \"\", m) z = F (, x) w = G (x,) }",
        )
        .unwrap();
        assert_eq!(g.node[0].input, vec!["x", "", "m"]);
        assert_eq!(g.node[1].input, vec!["", "x"]);
        assert_eq!(g.node[2].input, vec!["x"]);
    }

    #[test]
    fn domain_and_overload() {
        let g = parse_graph("g (float x) => (float y) { y = com.microsoft.Foo:v2 <a = 1> (x) }")
            .unwrap();
        assert_eq!(g.node[0].domain(), "com.microsoft");
        assert_eq!(g.node[0].op_type(), "Foo");
        assert_eq!(g.node[0].overload(), "v2");
        assert_eq!(g.node[0].attribute[0].i, Some(1));
    }

    #[test]
    fn summarised_tensor_is_rejected_clearly() {
        let e =
            parse_graph("g () => (float[2] w) <float[2] w = {... 2 values: crc32=00000000}> {}")
                .unwrap_err()
                .to_string();
        assert!(e.contains("summarised"), "{e}");
    }

    #[test]
    fn float_attr_accepts_int_and_special_words() {
        let g = parse_graph("g (float x) => (float y) { y = F <a: float = 2, b = -inf, c = NaN, d: floats = [1, 2.5]> (x) }").unwrap();
        let a = &g.node[0].attribute;
        assert_eq!(a[0].f, Some(2.0));
        assert_eq!(a[1].f, Some(f32::NEG_INFINITY));
        assert!(a[2].f.unwrap().is_nan());
        assert_eq!(a[3].floats, vec![1.0, 2.5]);
    }

    #[test]
    fn value_count_must_match_shape() {
        let e = parse_graph("g () => (float[3] w) <float[3] w = {1.0, 2.0}> {}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 values given"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let t = format!(
            "g ({}float{} x) => () {{}}",
            "seq(".repeat(10_000),
            ")".repeat(10_000)
        );
        assert!(parse_graph(&t).is_err());
    }
}
