//! Reading a JSON body the way its schema reads: numbers by value, and
//! objects only as objects.
//!
//! Two things serde would otherwise get wrong for the document: it takes
//! `12.0` for a float where a `u16` is expected (JSON does not tell `12` and
//! `12.0` apart, and JSON Schema counts both as integers), and it fills a
//! struct from an array, field by field (`[null, null]` would pass for a
//! patch). [`integral_numbers`] and [`Strict`] close both.

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use serde_json::{Map, Value};

/// Turns every float with a zero fraction that fits an `i64` into that integer.
pub fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && (i64::MIN as f64..=i64::MAX as f64).contains(&f)
            {
                *n = (f as i64).into();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// A JSON value that deserializes a struct from an object only.
pub struct Strict(pub Value);

fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

impl<'de> Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(Items(items.into_iter())),
            Value::Object(fields) => visitor.visit_map(Fields {
                fields: fields.into_iter(),
                value: None,
            }),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(&other), &"an object")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Items(std::vec::IntoIter<Value>);

impl<'de> de::SeqAccess<'de> for Items {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0
            .next()
            .map(|item| seed.deserialize(Strict(item)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Fields {
    fields: <Map<String, Value> as IntoIterator>::IntoIter,
    value: Option<Value>,
}

impl<'de> de::MapAccess<'de> for Fields {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.fields.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value before its key"))?;
        seed.deserialize(Strict(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RoutePatch, RouteSpec};
    use serde::de::DeserializeOwned;
    use serde_json::json;

    fn read<T: DeserializeOwned>(mut value: Value) -> Result<T, String> {
        integral_numbers(&mut value);
        serde_path_to_error::deserialize(Strict(value)).map_err(|e| e.to_string())
    }

    fn spec() -> Value {
        json!({
            "session_id": "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11",
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888.0, "weight": 1e2}],
            "frontend": {"port": 10000},
            "health_check": {"path": "/", "interval_s": 10.0},
            "access": {"allowed_client_ips": ["10.0.0.0/8"]},
            "labels": {"a": "b"},
            "args": {"x": [1, 2.5, null]},
            "expires_at": null
        })
    }

    #[test]
    fn integral_floats_read_as_integers() {
        let spec: RouteSpec = read(spec()).unwrap();
        assert_eq!(spec.targets[0].port, 8888);
        assert_eq!(spec.targets[0].weight, 100);
        assert_eq!(spec.args, Some(json!({"x": [1, 2.5, null]})));
        let v = spec_value_with(|v| v["targets"][0]["port"] = json!(8888.5));
        let err = read::<RouteSpec>(v).unwrap_err();
        assert!(err.starts_with("targets[0].port"), "{err}");
    }

    fn spec_value_with(f: impl FnOnce(&mut Value)) -> Value {
        let mut v = spec();
        f(&mut v);
        v
    }

    #[test]
    fn structs_come_from_objects_only() {
        for (path, bad) in [
            ("", json!(["x"])),
            ("health_check", json!({"health_check": ["/", 10, 5, 200]})),
            ("frontend", json!({"frontend": [null, null]})),
        ] {
            let body = if path.is_empty() {
                bad
            } else {
                spec_value_with(|v| {
                    v[path] = bad[path].clone();
                })
            };
            let err = read::<RouteSpec>(body).unwrap_err();
            assert!(err.contains("expected an object"), "{path}: {err}");
        }
        let err = read::<RoutePatch>(json!([null, null])).unwrap_err();
        assert!(err.contains("expected an object"), "{err}");
        let patch: RoutePatch = read(json!({"expires_at": null, "labels": {}})).unwrap();
        assert_eq!(patch.expires_at, Some(None));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_their_path() {
        let err = read::<RouteSpec>(spec_value_with(|v| v["colour"] = json!("blue"))).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = read::<RouteSpec>(spec_value_with(|v| {
            v["access"]["allowed_client_ips"] = json!([""]);
        }))
        .unwrap_err();
        assert!(err.starts_with("access.allowed_client_ips"), "{err}");
    }
}
