//! Small pieces every section of the page uses: HTML escaping ([`esc`], applied to every
//! string from the report), tolerant JSON access (a missing key is `None` or an empty list,
//! never an error), number formatting (bytes in binary units, counts with SI prefixes,
//! durations), node-name shortening, and the HTML fragments for cards, figures, legends and
//! bullet lists.

use std::fmt::Write as _;

use serde_json::Value;

use crate::report::plots;

/// HTML-escape text (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

pub(super) fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}
pub(super) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}
pub(super) fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    at(v, path).and_then(Value::as_f64)
}
pub(super) fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}
/// Any JSON value as short display text (strings unquoted).
pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(plots::compact).unwrap_or_default(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join("×"),
        other => other.to_string(),
    }
}

pub(super) fn human_bytes(b: f64) -> String {
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.2} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{b:.0} B")
    }
}

pub(super) fn human_count(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub(super) fn seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

pub(super) fn card(h: &mut String, key: &str, value: &str, sub: &str) {
    let _ = write!(
        h,
        "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{}</div><div class=\"s\">{}</div></div>",
        esc(key),
        esc(value),
        esc(sub)
    );
}

pub(super) fn figure(h: &mut String, svg: &str, caption: &str) {
    let _ = writeln!(
        h,
        "<figure>{svg}<figcaption>{}</figcaption></figure>",
        esc(caption)
    );
}

pub(super) fn legend(h: &mut String, items: &[(&str, plots::Rgb)]) {
    h.push_str("<div class=\"legend\">");
    for (name, c) in items {
        let _ = write!(
            h,
            "<span><i style=\"background:#{:02x}{:02x}{:02x}\"></i>{}</span>",
            c.0,
            c.1,
            c.2,
            esc(name)
        );
    }
    h.push_str("</div>\n");
}

pub(super) fn list(h: &mut String, title: &str, items: &[Value]) {
    if items.is_empty() {
        return;
    }
    let _ = write!(h, "<h3>{}</h3><ul>", esc(title));
    for i in items {
        let _ = write!(h, "<li>{}</li>", esc(&text(i)));
    }
    h.push_str("</ul>\n");
}

/// `node` (falling back to `tensor`) for a per-layer row.
pub(super) fn layer_label(w: &Value) -> String {
    str_at(w, &["node"])
        .or_else(|| str_at(w, &["tensor"]))
        .or_else(|| str_at(w, &["weight"]))
        .unwrap_or("?")
        .to_string()
}

/// The last two path components of an exporter-style node name (`features.4.0/Conv`).
pub(super) fn short_node(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() <= 2 {
        return s.to_string();
    }
    parts[parts.len() - 2..].join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<script>a&\"b'</script>"),
            "&lt;script&gt;a&amp;&quot;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn short_node_keeps_last_two_components() {
        assert_eq!(
            short_node("/features/features.4/features.4.0/Conv"),
            "features.4.0/Conv"
        );
        assert_eq!(short_node("conv1"), "conv1");
    }
}
