//! What one request may ask the grammar compiler to build, checked before anything compiles:
//! the bytes of each kind of constraint, and a JSON schema's shape (subschemas, properties,
//! definitions, enum values, nesting). llguidance's compilers recurse over a grammar's rules
//! and a schema's `$ref` chains, and its compile time grows with the square of an object's
//! optional properties; these bounds keep both far inside the compile threads' stack and the
//! time budget (docs/RELIABILITY.md, "Structured outputs" says how they were chosen).

use super::ConstraintSpec;
use serde_json::Value;

/// The bounds, each a named limit a refusal quotes.
pub mod max {
    /// Bytes of a JSON schema (compact JSON text), of one `response_format` or all of a
    /// request's tools together.
    pub const SCHEMA_BYTES: usize = 256 * 1024;
    /// Bytes of a Lark grammar (`structured_outputs.grammar`).
    pub const LARK_BYTES: usize = 64 * 1024;
    /// Bytes of a regular expression (`structured_outputs.regex`).
    pub const REGEX_BYTES: usize = 16 * 1024;
    /// Strings of `structured_outputs.choice`, and their bytes together.
    pub const CHOICES: usize = 1024;
    pub const CHOICE_BYTES: usize = 64 * 1024;
    /// Subschemas of one schema (or all tools together).
    pub const SCHEMA_NODES: usize = 10_000;
    /// Object properties in all (OpenAI's limit for structured outputs is 5,000).
    pub const PROPERTIES: usize = 5_000;
    /// `$defs` / `definitions` entries: a `$ref` chain is at most this long.
    pub const DEFINITIONS: usize = 1_000;
    /// `enum` values in all.
    pub const ENUM_VALUES: usize = 5_000;
    /// Subschemas nested inside each other.
    pub const SCHEMA_DEPTH: usize = 64;
    /// Tools of one request (OpenAI's limit).
    pub const TOOLS: usize = 128;
}

/// A bound a constraint exceeds: which one, what the request had, and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {value}; the limit is {limit}")]
pub struct LimitError {
    pub what: &'static str,
    pub value: usize,
    pub limit: usize,
}

fn within(what: &'static str, value: usize, limit: usize) -> Result<(), LimitError> {
    match value > limit {
        true => Err(LimitError { what, value, limit }),
        false => Ok(()),
    }
}

/// What a schema (or several) holds, summed as tools are added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchemaSize {
    pub bytes: usize,
    pub nodes: usize,
    pub properties: usize,
    pub definitions: usize,
    pub enum_values: usize,
}

impl SchemaSize {
    /// `self` plus the schema `v`; `Err` for the first bound either exceeds.
    pub fn with(mut self, v: &Value) -> Result<SchemaSize, LimitError> {
        self.bytes += v.to_string().len();
        within("the JSON schema's size in bytes", self.bytes, max::SCHEMA_BYTES)?;
        self.walk(v, 1)?;
        Ok(self)
    }

    fn walk(&mut self, v: &Value, depth: usize) -> Result<(), LimitError> {
        let Some(obj) = v.as_object() else {
            if let Value::Array(items) = v {
                for item in items {
                    self.walk(item, depth)?;
                }
            }
            return Ok(());
        };
        within("the JSON schema's nesting depth", depth, max::SCHEMA_DEPTH)?;
        self.nodes += 1;
        within("the number of subschemas", self.nodes, max::SCHEMA_NODES)?;
        for (k, sub) in obj {
            match k.as_str() {
                "properties" | "patternProperties" | "$defs" | "definitions" => {
                    let entries = sub.as_object().map_or(0, |m| m.len());
                    if k.starts_with('p') {
                        self.properties += entries;
                        within(
                            "the number of object properties",
                            self.properties,
                            max::PROPERTIES,
                        )?;
                    } else {
                        self.definitions += entries;
                        within("the number of definitions", self.definitions, max::DEFINITIONS)?;
                    }
                    for s in sub.as_object().into_iter().flat_map(|m| m.values()) {
                        self.walk(s, depth + 1)?;
                    }
                }
                "enum" => {
                    self.enum_values += sub.as_array().map_or(1, Vec::len);
                    within("the number of `enum` values", self.enum_values, max::ENUM_VALUES)?;
                }
                // Values, not schemas.
                "const" | "default" | "examples" | "required" | "x-guidance" => {}
                _ => self.walk(sub, depth + 1)?,
            }
        }
        Ok(())
    }
}

/// Checks a request's constraint against the bounds before it is compiled.
pub fn check(spec: &ConstraintSpec) -> Result<(), LimitError> {
    match spec {
        ConstraintSpec::JsonObject => Ok(()),
        ConstraintSpec::JsonSchema(text) => {
            within("the JSON schema's size in bytes", text.len(), max::SCHEMA_BYTES)?;
            // Unparsable text is the compiler's error to name; the bounds are about shapes.
            match serde_json::from_str::<Value>(text) {
                Ok(v) => SchemaSize::default().with(&v).map(|_| ()),
                Err(_) => Ok(()),
            }
        }
        ConstraintSpec::Regex(rx) => {
            within("the regular expression's size in bytes", rx.len(), max::REGEX_BYTES)
        }
        ConstraintSpec::Lark(text) => {
            within("the grammar's size in bytes", text.len(), max::LARK_BYTES)
        }
        ConstraintSpec::Choice(options) => {
            within("the number of choices", options.len(), max::CHOICES)?;
            let bytes = options.iter().map(String::len).sum();
            within("the choices' size in bytes", bytes, max::CHOICE_BYTES)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(n: usize) -> Value {
        let props: serde_json::Map<String, Value> =
            (0..n).map(|i| (format!("p{i}"), json!({"type": "integer"}))).collect();
        json!({"type": "object", "properties": props})
    }

    #[test]
    fn each_bound_is_named_with_its_value() {
        let e = SchemaSize::default().with(&flat(max::PROPERTIES + 1)).unwrap_err();
        assert_eq!(e.what, "the number of object properties");
        assert_eq!((e.value, e.limit), (max::PROPERTIES + 1, max::PROPERTIES));
        assert!(SchemaSize::default().with(&flat(100)).is_ok());
        let mut deep = json!({"type": "string"});
        for _ in 0..max::SCHEMA_DEPTH {
            deep = json!({"type": "array", "items": deep});
        }
        assert_eq!(
            SchemaSize::default().with(&deep).unwrap_err().what,
            "the JSON schema's nesting depth"
        );
        let e = check(&ConstraintSpec::Lark("a".repeat(max::LARK_BYTES + 1))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the grammar's size in bytes is {}; the limit is {}",
                max::LARK_BYTES + 1,
                max::LARK_BYTES
            )
        );
        let many = ConstraintSpec::Choice(vec!["x".into(); max::CHOICES + 1]);
        assert_eq!(check(&many).unwrap_err().what, "the number of choices");
    }

    #[test]
    fn sizes_add_up_across_schemas() {
        let half = flat(max::PROPERTIES / 2 + 1);
        let one = SchemaSize::default().with(&half).unwrap();
        assert_eq!(one.with(&half).unwrap_err().what, "the number of object properties");
    }
}
