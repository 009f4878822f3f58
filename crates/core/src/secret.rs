//! Secrets: values that are never printed, never logged, and compared in
//! constant time; and the two shared bearer tokens the API checks.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};
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

    /// Whether `given` is this secret. Both sides are hashed first and the
    /// two digests compared in constant time, so the time a comparison
    /// takes depends neither on where they differ nor on `given`'s length.
    pub fn matches(&self, given: &str) -> bool {
        same_digest(given, &self.0)
    }
}

/// SHA-256 of `text`: what tokens are compared and stored as.
pub fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// `a == b`, compared as SHA-256 digests in constant time.
fn same_digest(a: &str, b: &str) -> bool {
    sha256(a).ct_eq(&sha256(b)).into()
}

impl PartialEq for Secret {
    /// As [`Secret::matches`]: digests compared in constant time.
    fn eq(&self, other: &Secret) -> bool {
        same_digest(&self.0, &other.0)
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

/// The shared bearer tokens.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// For managers: routes, sessions, workers.
    pub manager: Secret,
    /// For workers to register with.
    pub worker: Secret,
    /// For the status page only (`/ui`), read-only; none unless configured.
    pub viewer: Option<Secret>,
}

/// The two secrets a Backend.AI installation shares with its coordinator.
#[derive(Clone, Debug)]
pub struct BackendAiSecrets {
    /// Authenticates the Manager and the workers.
    pub api_secret: Secret,
    /// Signs the tokens workers check on proxied traffic.
    pub jwt_secret: Secret,
}

/// `postgres://user:secret@host/db` → `postgres://user:<redacted>@host/db`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split(':').next().unwrap_or_default();
    let masked = if userinfo.contains(':') {
        format!("{user}:<redacted>")
    } else {
        user.to_owned()
    };
    let mut out = format!("{scheme}://{masked}@{host}{path}");
    if let Some(q) = out.find("password=") {
        let end = out[q..].find('&').map_or(out.len(), |e| q + e);
        out.replace_range(q..end, "password=<redacted>");
    }
    out
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

    #[test]
    fn a_given_value_matches_only_the_whole_secret() {
        let s = Secret::new("0123456789abcdef-api-secret");
        assert!(s.matches("0123456789abcdef-api-secret"));
        // Prefixes, extensions and values of other lengths are compared as
        // digests of the same size, never byte by byte until a mismatch.
        for other in [
            "",
            "0",
            "0123456789abcdef",
            "0123456789abcdef-api-secret ",
            "0123456789abcdef-api-secreT",
        ] {
            assert!(!s.matches(other), "{other:?}");
        }
    }

    #[test]
    fn urls_without_passwords_are_left_alone() {
        assert_eq!(redacted_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(
            redacted_url("postgres://u@h/db?password=s&x=1"),
            "postgres://u@h/db?password=<redacted>&x=1"
        );
    }
}
