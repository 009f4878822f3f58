//! The core bus's stream as Redis answers it: entries (`XREADGROUP`,
//! `XAUTOCLAIM`), what an entry asks of the consumer, and the group's
//! consumers (`XINFO CONSUMERS`). Pure: no I/O.

use redis::Value;
use uuid::Uuid;

use super::SESSION_TERMINATED;

/// One entry of the stream: its id and fields (`None` when the stream no
/// longer holds it, as a pending entry trimmed away).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// What an entry asks of us.
#[derive(Clone, Debug, PartialEq)]
pub enum Meaning {
    /// `session_terminated` of this session.
    Terminated(Uuid),
    /// Another event: not ours.
    Other,
    /// Trimmed from the stream while pending: nothing left to read.
    Gone,
    /// Unreadable, and why.
    Malformed(String),
}

#[derive(serde::Deserialize)]
struct TerminatedPayload {
    session_id: Uuid,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The trace its producer was in, if its metadata says one.
    pub fn traceparent(&self) -> Option<String> {
        let metadata: crate::backendai::bus::Metadata =
            serde_json::from_slice(self.field("metadata")?).ok()?;
        metadata.traceparent
    }

    /// What the entry means.
    pub fn meaning(&self) -> Meaning {
        if self.fields.is_none() {
            return Meaning::Gone;
        }
        let Some(name) = self.field("name") else {
            return Meaning::Malformed("no name field".into());
        };
        if name != SESSION_TERMINATED.as_bytes() {
            return Meaning::Other;
        }
        let Some(payload) = self.field("payload") else {
            return Meaning::Malformed("no payload field".into());
        };
        match serde_json::from_slice::<TerminatedPayload>(payload) {
            Ok(p) => Meaning::Terminated(p.session_id),
            Err(e) => Meaning::Malformed(format!("payload: {e}")),
        }
    }
}

/// A reply's text (ids, field names).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(value: &Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b.clone(),
        other => text(other).unwrap_or_default().into_bytes(),
    }
}

/// `[id, [field, value, …]]` (or its fields nil).
fn entry(value: &Value) -> Option<Entry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1) {
        Some(Value::Array(flat)) => Some(
            flat.chunks(2)
                .filter_map(|kv| Some((text(&kv[0])?, bytes(kv.get(1)?))))
                .collect(),
        ),
        Some(Value::Map(pairs)) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, bytes(v))))
                .collect(),
        ),
        _ => None,
    };
    Some(Entry { id, fields })
}

fn entries(value: &Value) -> Vec<Entry> {
    match value {
        Value::Array(items) => items.iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREADGROUP` reply (of one stream); none on a timeout.
pub fn read_reply(value: &Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => entries(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

/// An `XAUTOCLAIM` reply: the cursor to go on from (`0-0`: done) and the
/// entries now ours.
pub fn claim_reply(value: &Value) -> (String, Vec<Entry>) {
    match value {
        Value::Array(parts) if parts.len() >= 2 => (
            text(&parts[0]).unwrap_or_else(|| "0-0".into()),
            entries(&parts[1]),
        ),
        _ => ("0-0".into(), Vec::new()),
    }
}

/// A consumer of the group, as `XINFO CONSUMERS` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupConsumer {
    pub name: String,
    pub pending: i64,
    pub idle_ms: i64,
}

/// An `XINFO CONSUMERS` reply.
pub fn consumers_reply(value: &Value) -> Vec<GroupConsumer> {
    let Value::Array(consumers) = value else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|c| {
            let pairs: Vec<(String, &Value)> = match c {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| Some((text(&kv[0])?, kv.get(1)?)))
                    .collect(),
                Value::Map(pairs) => pairs
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, v)))
                    .collect(),
                _ => return None,
            };
            let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
            let number = |key: &str| get(key).and_then(text).and_then(|t| t.parse().ok());
            Some(GroupConsumer {
                name: text(get("name")?)?,
                pending: number("pending")?,
                idle_ms: number("idle")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backendai::sessions::STREAM;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn raw(id: &str, fields: &[(&str, &str)]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), bulk(v)])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn the_real_producer_s_entry_is_a_terminated_session() {
        // As backend-ai-common 26.9.6 writes it (shared/BACKENDAI.md §4.6).
        let session = Uuid::new_v4();
        let payload = format!(r#"{{"session_id":"{session}","reason":"user-requested"}}"#);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(STREAM),
            Value::Array(vec![
                raw(
                    "1-0",
                    &[
                        ("name", SESSION_TERMINATED),
                        ("source", "manager"),
                        ("payload", &payload),
                        ("metadata", crate::backendai::bus::METADATA),
                    ],
                ),
                raw("2-0", &[("name", "session_started"), ("payload", "{}")]),
            ]),
        ])]);
        let read = read_reply(&reply);
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].id, "1-0");
        assert_eq!(read[0].meaning(), Meaning::Terminated(session));
        assert_eq!(read[0].traceparent(), None);
        assert_eq!(read[1].meaning(), Meaning::Other);
        assert!(read_reply(&Value::Nil).is_empty(), "a BLOCK that timed out");
    }

    #[test]
    fn unreadable_entries_are_malformed_and_trimmed_ones_gone() {
        let meaning = |fields: &[(&str, &str)]| entry(&raw("1-0", fields)).unwrap().meaning();
        let malformed = |m: Meaning| matches!(m, Meaning::Malformed(_));
        assert!(malformed(meaning(&[("source", "manager")])));
        assert!(malformed(meaning(&[("name", SESSION_TERMINATED)])));
        assert!(malformed(meaning(&[
            ("name", SESSION_TERMINATED),
            ("payload", "not json")
        ])));
        assert!(malformed(meaning(&[
            ("name", SESSION_TERMINATED),
            ("payload", r#"{"session_id":"nope"}"#)
        ])));
        let trimmed = Value::Array(vec![bulk("1-0"), Value::Nil]);
        assert_eq!(entry(&trimmed).unwrap().meaning(), Meaning::Gone);
    }

    #[test]
    fn autoclaim_replies_give_the_cursor_and_the_entries() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![raw("3-0", &[("name", "x")])]),
            Value::Array(vec![]),
        ]);
        let (next, claimed) = claim_reply(&reply);
        assert_eq!(next, "5-0");
        assert_eq!(claimed[0].id, "3-0");
        assert_eq!(claim_reply(&Value::Nil).0, "0-0");
    }

    #[test]
    fn consumers_are_read_from_xinfo() {
        let consumer = |name: &str, pending: i64, idle: i64| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Int(pending),
                bulk("idle"),
                Value::Int(idle),
                bulk("inactive"),
                Value::Int(idle),
            ])
        };
        let reply = Value::Array(vec![consumer("a", 0, 400_000), consumer("b", 2, 10)]);
        assert_eq!(
            consumers_reply(&reply),
            [
                GroupConsumer {
                    name: "a".into(),
                    pending: 0,
                    idle_ms: 400_000
                },
                GroupConsumer {
                    name: "b".into(),
                    pending: 2,
                    idle_ms: 10
                },
            ]
        );
    }
}
