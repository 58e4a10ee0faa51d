//! One string field of a JSON line, read without building the rest of the object: `.jsonl`
//! records of real corpora carry metadata that would otherwise be allocated and thrown away.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

pub(super) enum Field {
    Text(String),
    Missing,
    NotAString(&'static str),
}

/// The string field `name` of a JSON object, ignoring (without building) every other field.
pub(super) fn json_field(line: &str, name: &str) -> Result<Field, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let field = FieldSeed(name).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(field)
}

struct FieldSeed<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Field;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        let mut out = Field::Missing;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.0))? {
            if is_field && matches!(out, Field::Missing) {
                out = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(s) => Field::Text(s),
                    serde_json::Value::Null => Field::NotAString("null"),
                    serde_json::Value::Bool(_) => Field::NotAString("a boolean"),
                    serde_json::Value::Number(_) => Field::NotAString("a number"),
                    serde_json::Value::Array(_) => Field::NotAString("an array"),
                    serde_json::Value::Object(_) => Field::NotAString("an object"),
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// Deserializes a map key to whether it equals the wanted name, without allocating it.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}
