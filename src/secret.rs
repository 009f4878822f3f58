//! Secrets: values that are never printed, never logged, and compared in
//! constant time; and the two shared bearer tokens the API checks.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use subtle::ConstantTimeEq;

/// A secret value.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Secret {
    /// In constant time, so a comparison reveals nothing of where two differ.
    fn eq(&self, other: &Secret) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The two shared bearer tokens.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// For managers: routes, sessions, workers.
    pub manager: Secret,
    /// For workers to register with.
    pub worker: Secret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_and_compare_by_value() {
        let s = Secret::new("hunter2-hunter2-hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s, Secret::new("hunter2-hunter2-hunter2"));
        assert_ne!(s, Secret::new("hunter2-hunter2-hunter3"));
        assert_ne!(s, Secret::new("hunter2"));
    }
}
