//! The status page's session cookie: who logged in (the manager or the viewer
//! token) and until when, signed with HMAC-SHA256 keyed by that token itself.
//! Nothing is stored: every replica sharing the tokens accepts it, and
//! changing a token ends every session it opened.
//!
//! Value: `<m|v>.<expires, unix seconds>.<base64url MAC>`; the MAC covers a
//! purpose string, the kind and the expiry.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret::Tokens;

/// The cookie's name.
pub const COOKIE: &str = "appproxy_ui";
/// How long a session lasts (seconds).
pub const TTL_SECONDS: i64 = 12 * 3600;

/// Which token opened a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manager,
    Viewer,
}

impl Kind {
    fn letter(self) -> &'static str {
        match self {
            Kind::Manager => "m",
            Kind::Viewer => "v",
        }
    }

    fn key(self, tokens: &Tokens) -> Option<&str> {
        match self {
            Kind::Manager => Some(tokens.manager.expose()),
            Kind::Viewer => tokens.viewer.as_ref().map(|v| v.expose()),
        }
    }
}

fn mac(key: &str, kind: Kind, expires: i64) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("appproxy-ui-session\0{}\0{expires}", kind.letter()).as_bytes());
    mac
}

/// A session of `kind` expiring at `expires` (unix seconds); `None` when
/// that kind of token is not configured.
pub fn issue(tokens: &Tokens, kind: Kind, expires: i64) -> Option<String> {
    let key = kind.key(tokens)?;
    let tag = URL_SAFE_NO_PAD.encode(mac(key, kind, expires).finalize().into_bytes());
    Some(format!("{}.{expires}.{tag}", kind.letter()))
}

/// The session `value` carries, if it is genuine and not expired at `now`.
pub fn verify(tokens: &Tokens, value: &str, now: i64) -> Option<Kind> {
    let mut parts = value.split('.');
    let (Some(kind), Some(expires), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let kind = match kind {
        "m" => Kind::Manager,
        "v" => Kind::Viewer,
        _ => return None,
    };
    let expires: i64 = expires.parse().ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    // Constant time (`verify_slice`); the expiry only after the MAC holds.
    mac(kind.key(tokens)?, kind, expires)
        .verify_slice(&tag)
        .ok()?;
    (now < expires).then_some(kind)
}

/// The session cookie's value among a request's `Cookie` headers.
pub fn from_headers(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for `value` (an empty value with `Max-Age=0` logs out).
pub fn set_cookie(value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn tokens(viewer: Option<&str>) -> Tokens {
        Tokens {
            manager: Secret::new("0123456789abcdef-manager"),
            worker: Secret::new("0123456789abcdef-worker"),
            viewer: viewer.map(Secret::new),
        }
    }

    #[test]
    fn a_session_holds_until_it_expires_and_only_with_the_token_that_opened_it() {
        let t = tokens(Some("0123456789abcdef-viewer"));
        let s = issue(&t, Kind::Viewer, 1000).unwrap();
        assert_eq!(verify(&t, &s, 999), Some(Kind::Viewer));
        assert_eq!(verify(&t, &s, 1000), None, "expired");
        // A changed viewer token ends it; the manager's key does not sign it.
        assert_eq!(verify(&tokens(Some("0123456789abcdef-other")), &s, 1), None);
        assert_eq!(verify(&tokens(None), &s, 1), None);
        // Tampering: a later expiry, another kind, a cut tag.
        let forged = s.replacen(".1000.", ".9999.", 1);
        assert_eq!(verify(&t, &forged, 1), None);
        assert_eq!(verify(&t, &format!("m{}", &s[1..]), 1), None);
        assert_eq!(verify(&t, &s[..s.len() - 2], 1), None);
        assert_eq!(verify(&t, "", 1), None);
        assert_eq!(verify(&t, "v.1000", 1), None);
        let m = issue(&t, Kind::Manager, 1000).unwrap();
        assert_eq!(verify(&t, &m, 1), Some(Kind::Manager));
        assert!(issue(&tokens(None), Kind::Viewer, 1000).is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = axum::http::HeaderMap::new();
        h.append("cookie", "a=b; appproxy_ui=v.1.x".parse().unwrap());
        assert_eq!(from_headers(&h), Some("v.1.x"));
        assert!(set_cookie("x", 5, true).ends_with("HttpOnly; SameSite=Strict; Secure"));
    }
}
