//! Which JSON Schema keywords a constraint may use: those the grammar enforces, plus pure
//! annotations. llguidance refuses the JSON Schema keywords it does not implement but skips
//! words it does not know, so a typo (`maxLenght`) or a vendor keyword would silently
//! constrain nothing; this walk refuses every other key by name and place.

use serde_json::Value;

/// Keywords the grammar enforces.
const ENFORCED: [&str; 27] = [
    "type",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "minProperties",
    "maxProperties",
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Keywords that describe and constrain nothing (and llguidance's own options).
const ANNOTATIONS: [&str; 17] = [
    "$schema",
    "$id",
    "id",
    "$anchor",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "readOnly",
    "writeOnly",
    "deprecated",
    "contentMediaType",
    "contentEncoding",
    "x-guidance",
];

/// Keywords whose value is a map from names to subschemas.
const SCHEMA_MAPS: [&str; 4] = ["properties", "patternProperties", "$defs", "definitions"];
/// Keywords whose value is a subschema or a list of them.
const SUBSCHEMAS: [&str; 7] =
    ["items", "prefixItems", "additionalItems", "additionalProperties", "anyOf", "oneOf", "allOf"];

/// `Err` names the first key of `schema` (or a subschema) that is no supported keyword, with
/// its JSON pointer.
pub fn check(schema: &Value) -> Result<(), String> {
    walk(schema, "#")
}

fn walk(schema: &Value, at: &str) -> Result<(), String> {
    let Some(obj) = schema.as_object() else { return Ok(()) };
    for (k, v) in obj {
        if !ENFORCED.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
            return Err(format!(
                "unsupported JSON Schema keyword `{}` at `{at}` (supported: {})",
                k.escape_debug(),
                ENFORCED.join(", ")
            ));
        }
        let here = format!("{at}/{k}");
        if SCHEMA_MAPS.contains(&k.as_str()) {
            for (name, sub) in v.as_object().into_iter().flatten() {
                walk(sub, &format!("{here}/{}", name.replace('~', "~0").replace('/', "~1")))?;
            }
        } else if SUBSCHEMAS.contains(&k.as_str()) {
            match v {
                Value::Array(items) => {
                    for (i, sub) in items.iter().enumerate() {
                        walk(sub, &format!("{here}/{i}"))?;
                    }
                }
                sub => walk(sub, &here)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;
    use serde_json::json;

    #[test]
    fn refuses_unknown_and_unenforced_keywords_by_name_and_place() {
        let ok = json!({"type": "object", "title": "P", "properties": {"not": {"type": "string",
            "maxLength": 3}}, "$defs": {"x": {"anyOf": [{"type": "integer"}]}}});
        assert_eq!(check(&ok), Ok(()));
        let typo = json!({"properties": {"a": {"type": "string", "maxLenght": 3}}});
        let e = check(&typo).unwrap_err();
        assert!(e.contains("`maxLenght` at `#/properties/a`"), "{e}");
        let not = json!({"anyOf": [{"type": "string"}, {"not": {"type": "integer"}}]});
        assert!(check(&not).unwrap_err().contains("`not` at `#/anyOf/1`"));
    }
}
