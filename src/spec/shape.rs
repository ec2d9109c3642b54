//! The shape of a document, checked whole: every unknown field, wrong type,
//! unknown enum value and missing field of a document that did not
//! deserialize, not only the first one serde stops at (issue 30: a
//! document with seven faults showed one per run).
//!
//! It walks the document's YAML tree beside the spec's own JSON Schema
//! (`schema::json_schema`, the one editors use), so the two cannot
//! disagree on what is allowed. It also returns the document with what it
//! refused taken out (and a required number it refused replaced by its
//! minimum), so the per-field rules of `validate` can still run over the
//! rest and report their findings in the same run.

use super::validate::Problem;
use serde_json::Value as Schema;
use serde_yaml::Value;
use std::collections::BTreeSet;

/// The spec's JSON Schema, made once.
fn schema() -> &'static Schema {
    static SCHEMA: std::sync::OnceLock<Schema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(super::schema::json_schema)
}

/// The most faults of shape said of one document: a file of a megabyte of
/// bogus keys would otherwise say hundreds of thousands.
pub const MAX_PROBLEMS: usize = 50;

/// What the walk found in one document.
pub(super) struct Shape {
    /// Every fault of shape, as `(field path, message)`; at most
    /// [`MAX_PROBLEMS`], then one saying how many more.
    pub problems: Vec<Problem>,
    /// The document without them, for the per-field rules.
    pub repaired: Value,
    /// Field paths whose value was taken out or replaced: the per-field
    /// rules say nothing more about them.
    pub touched: BTreeSet<String>,
}

/// Walks `doc` against the spec's schema.
pub(super) fn check(doc: &Value) -> Shape {
    let mut walk = Walk {
        root: schema(),
        problems: Vec::new(),
        touched: BTreeSet::new(),
    };
    let mut repaired = doc.clone();
    walk.node(walk.root, &mut repaired, "");
    let mut problems = walk.problems;
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        problems.truncate(MAX_PROBLEMS);
        problems.push((
            String::new(),
            format!("and {more} more faults in this document"),
        ));
    }
    Shape {
        problems,
        repaired,
        touched: walk.touched,
    }
}

struct Walk<'s> {
    root: &'s Schema,
    problems: Vec<Problem>,
    touched: BTreeSet<String>,
}

/// What became of a node.
enum Kept {
    /// As it was, or repaired inside.
    Yes,
    /// Wrong as a whole: its parent takes it out.
    No,
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// How a YAML value reads in a message, bounded and escaped, in serde's
/// words (so one fault reads the same whichever pass found it).
fn found(v: &Value) -> String {
    match v {
        Value::Null => "unit value".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => {
            format!(
                "floating point `{}`",
                super::error::excerpt_bare(&n.to_string())
            )
        }
        Value::Number(n) => format!("integer `{}`", super::error::excerpt_bare(&n.to_string())),
        Value::String(s) => format!("string {}", super::error::excerpt(s)),
        Value::Sequence(_) => "sequence".into(),
        Value::Mapping(_) => "map".into(),
        Value::Tagged(t) => found(&t.value),
    }
}

/// Whether `v` is of JSON Schema type `ty`.
fn is_type(v: &Value, ty: &str) -> bool {
    match ty {
        "null" => v.is_null(),
        "boolean" => v.is_bool(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_sequence(),
        "object" => v.is_mapping(),
        _ => true,
    }
}

fn expected(types: &[&str]) -> String {
    let word = |t: &str| match t {
        "boolean" => "a boolean (true or false)",
        "integer" => "an integer",
        "number" => "a number",
        "string" => "a string (quote a value that reads as a number or a boolean)",
        "array" => "a list",
        "object" => "a mapping",
        _ => "a value",
    };
    types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| word(t))
        .collect::<Vec<_>>()
        .join(" or ")
}

impl<'s> Walk<'s> {
    /// Follows a `$ref` into `$defs`.
    fn resolve(&self, mut s: &'s Schema) -> &'s Schema {
        for _ in 0..8 {
            let Some(r) = s.get("$ref").and_then(Schema::as_str) else {
                break;
            };
            let Some(name) = r.strip_prefix("#/$defs/") else {
                break;
            };
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(next) => s = next,
                None => break,
            }
        }
        s
    }

    fn problem(&mut self, path: &str, message: String) {
        self.problems.push((path.to_string(), message));
    }

    /// Checks `v` at `path` against `s`; repairs inside it.
    fn node(&mut self, s: &'s Schema, v: &mut Value, path: &str) -> Kept {
        let s = self.resolve(s);
        if let Value::Tagged(t) = v {
            let inner = &mut t.value;
            return self.node(s, inner, path);
        }
        // Option<T>: `anyOf: [T, {type: null}]`.
        if let Some(any) = s.get("anyOf").and_then(Schema::as_array) {
            if v.is_null() && any.iter().any(|a| a.get("type") == Some(&"null".into())) {
                return Kept::Yes;
            }
            if let Some(t) = any.iter().find(|a| a.get("type") != Some(&"null".into())) {
                return self.node(t, v, path);
            }
        }
        // An enum: `oneOf` of constants.
        if let Some(one) = s.get("oneOf").and_then(Schema::as_array) {
            let consts: Vec<&str> = one
                .iter()
                .filter_map(|o| o.get("const").and_then(Schema::as_str))
                .collect();
            if !consts.is_empty() && consts.len() == one.len() {
                if v.as_str().is_some_and(|x| consts.contains(&x)) {
                    return Kept::Yes;
                }
                let list = consts
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let what = match v.as_str() {
                    Some(x) => format!("unknown variant `{}`", super::error::excerpt_unquoted(x)),
                    None => format!("invalid type: {}", found(v)),
                };
                self.problem(path, format!("{what}, expected one of {list}"));
                return Kept::No;
            }
        }
        let types: Vec<&str> = match s.get("type") {
            Some(Schema::String(t)) => vec![t.as_str()],
            Some(Schema::Array(ts)) => ts.iter().filter_map(Schema::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() && !types.iter().any(|t| is_type(v, t)) {
            // A whole number written as a float is still no integer.
            let message = format!("invalid type: {}, expected {}", found(v), expected(&types));
            self.problem(path, message);
            return Kept::No;
        }
        // Bounds of integers, as the per-field rules word them: a number out
        // of its type's range would not deserialize for them to see.
        if let Some(n) = v.as_i64().map(i128::from).or(v.as_u64().map(i128::from)) {
            let bound = |k: &str| {
                s.get(k)
                    .and_then(|b| b.as_i64().map(i128::from).or(b.as_u64().map(i128::from)))
            };
            if let (Some(min), Some(max)) = (bound("minimum"), bound("maximum"))
                && !(min..=max).contains(&n)
            {
                self.problem(path, format!("{n} is out of range {min}–{max}"));
                return Kept::No;
            }
        }
        match v {
            Value::Mapping(m) => self.mapping(s, m, path),
            Value::Sequence(items) => {
                if let Some(item) = s.get("items") {
                    let mut i = 0;
                    items.retain_mut(|x| {
                        let at = format!("{path}[{i}]");
                        i += 1;
                        let kept = matches!(self.node(item, x, &at), Kept::Yes);
                        if !kept {
                            self.touched.insert(at);
                        }
                        kept
                    });
                }
                Kept::Yes
            }
            _ => Kept::Yes,
        }
    }

    fn mapping(&mut self, s: &'s Schema, m: &mut serde_yaml::Mapping, path: &str) -> Kept {
        let props = s.get("properties").and_then(Schema::as_object);
        let closed = s.get("additionalProperties") == Some(&Schema::Bool(false));
        let values = s.get("additionalProperties").filter(|a| a.is_object());
        let keys: Vec<Value> = m.keys().cloned().collect();
        for key in keys {
            let Some(name) = key.as_str().map(str::to_string) else {
                if closed {
                    self.problem(path, format!("a key that is not a name: {}", found(&key)));
                    m.remove(&key);
                    self.touched.insert(path.to_string());
                }
                continue;
            };
            // A key is part of a field path only when it reads as a name:
            // anything else is quoted in the message alone, bounded.
            let plain = name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/'));
            let at = if plain {
                child(path, &name)
            } else {
                path.to_string()
            };
            // A key that is no name is said, taken out, and silences no
            // rule of its parent (`touched` is for fields).
            let mark = |walk: &mut Self, at: &str| {
                if plain {
                    walk.touched.insert(at.to_string());
                }
            };
            let schema = props.and_then(|p| p.get(&name)).or(values);
            let Some(schema) = schema else {
                if closed {
                    let known: Vec<&String> = props.map(|p| p.keys().collect()).unwrap_or_default();
                    let list = known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let hint = known
                        .iter()
                        .map(|k| (strsim::jaro_winkler(&name, k), k))
                        .filter(|(score, _)| *score > 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0))
                        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                        .unwrap_or_default();
                    self.problem(
                        &at,
                        format!(
                            "unknown field `{}`, expected one of {list}{hint}",
                            super::error::excerpt_unquoted(&name)
                        ),
                    );
                    m.remove(&key);
                    mark(self, &at);
                }
                continue;
            };
            let Some(v) = m.get_mut(&key) else {
                continue;
            };
            if let Kept::No = self.node(schema, v, &at) {
                self.touched.insert(at.clone());
                // A required number is put back at its minimum, so the
                // rest of the document can still be read whole.
                let required = s
                    .get("required")
                    .and_then(Schema::as_array)
                    .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(&name)));
                let schema = self.resolve(schema);
                match (required, stand_in(schema)) {
                    (true, Some(x)) => {
                        m.insert(key, x);
                    }
                    _ => {
                        m.remove(&key);
                    }
                }
            }
        }
        if let Some(required) = s.get("required").and_then(Schema::as_array) {
            for r in required.iter().filter_map(Schema::as_str) {
                // Refused above is said once, as refused.
                if !m.contains_key(r) && !self.touched.contains(&child(path, r)) {
                    let at = child(path, r);
                    self.problem(&at, "required field is missing".into());
                    self.touched.insert(at);
                    if let Some(x) = props
                        .and_then(|p| p.get(r))
                        .and_then(|p| stand_in(self.resolve(p)))
                    {
                        m.insert(Value::String(r.to_string()), x);
                    }
                }
            }
        }
        Kept::Yes
    }
}

/// What stands in for a required value that was refused or missing, so
/// the rest can be read: a number's minimum, an enum's first value; `None`
/// when nothing can (the per-field rules then do not run).
fn stand_in(s: &Schema) -> Option<Value> {
    if let Some(c) = s.get("const").and_then(Schema::as_str) {
        return Some(Value::String(c.to_string()));
    }
    if let Some(first) = s
        .get("oneOf")
        .and_then(Schema::as_array)
        .and_then(|o| o.first())
        .and_then(|o| o.get("const"))
        .and_then(Schema::as_str)
    {
        return Some(Value::String(first.to_string()));
    }
    let integer = match s.get("type") {
        Some(Schema::String(t)) => t == "integer",
        Some(Schema::Array(ts)) => ts.iter().any(|t| t == "integer"),
        _ => false,
    };
    if !integer {
        return None;
    }
    let min = s.get("minimum").and_then(Schema::as_u64).unwrap_or(0);
    Some(Value::Number(min.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_yaml::from_str(text).expect("yaml")
    }

    #[test]
    fn every_fault_of_shape_is_found_and_taken_out() {
        let d = doc(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: web\n  labls: {a: b}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernal: /k\n  processors:\n    count: two\n  memory:\n    backing: fast\n  scsiControllers:\n    - id: 0\n      disks:\n        - {lun: 0, path: /a.img, type: vhd2}\n",
        );
        let shape = check(&d);
        let found: Vec<(&str, &str)> = shape
            .problems
            .iter()
            .map(|(f, m)| (f.as_str(), m.as_str()))
            .collect();
        let has = |field: &str, start: &str| {
            found
                .iter()
                .any(|(f, m)| *f == field && m.starts_with(start))
        };
        assert!(
            has(
                "metadata.labls",
                "unknown field `labls`, expected one of `labels`, `name` (did you mean `labels`?)"
            ),
            "{found:?}"
        );
        assert!(
            has("spec.boot.linuxKernelDirect.kernal", "unknown field"),
            "{found:?}"
        );
        assert!(
            has(
                "spec.boot.linuxKernelDirect.kernel",
                "required field is missing"
            ),
            "{found:?}"
        );
        assert!(
            has(
                "spec.processors.count",
                "invalid type: string \"two\", expected an integer"
            ),
            "{found:?}"
        );
        assert!(
            has(
                "spec.memory.backing",
                "unknown variant `fast`, expected one of `virtual`, `physical`"
            ),
            "{found:?}"
        );
        assert!(
            has("spec.memory.sizeMB", "required field is missing"),
            "{found:?}"
        );
        assert!(
            has(
                "spec.scsiControllers[0].disks[0].type",
                "unknown variant `vhd2`"
            ),
            "{found:?}"
        );
        assert_eq!(found.len(), 7, "{found:?}");
        // The repaired document: unknown fields out, the count at its minimum.
        assert!(shape.repaired["metadata"].get("labls").is_none());
        assert_eq!(
            shape.repaired["spec"]["processors"]["count"],
            Value::Number(1.into())
        );
        assert!(shape.touched.contains("spec.processors.count"));
    }

    /// A file of bogus keys says a bounded number of faults.
    #[test]
    fn faults_are_bounded_per_document() {
        let mut text = String::from("apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\n");
        for i in 0..200 {
            text.push_str(&format!("k{i}: 1\n"));
        }
        let shape = check(&doc(&text));
        assert_eq!(shape.problems.len(), MAX_PROBLEMS + 1);
        let last = &shape.problems[MAX_PROBLEMS].1;
        assert!(
            last.starts_with("and ") && last.ends_with(" more faults in this document"),
            "{last}"
        );
    }

    #[test]
    fn a_well_shaped_document_has_no_fault() {
        let d = doc(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: web\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n    backing: physical\n  networkAdapters: []\n",
        );
        let shape = check(&d);
        assert!(shape.problems.is_empty(), "{:?}", shape.problems);
    }
}
