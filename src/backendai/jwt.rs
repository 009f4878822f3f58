//! HS256 JSON Web Tokens, the only kind Backend.AI uses: the setup token of
//! an interactive app and the endpoint token of an inference route (both
//! signed with the jwt_secret and checked by the worker), and the Bearer
//! tokens a Manager may authenticate with (signed with the api_secret).
//!
//! Written here rather than taken from `jsonwebtoken`: that crate needs a
//! crypto backend feature, and its pure-Rust one compiles RSA, ECDSA and
//! EdDSA, none of which Backend.AI uses; HS256 is one HMAC over two
//! base64url strings.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a JSON Web Token")]
    Malformed,
    #[error("algorithm is not HS256")]
    Algorithm,
    #[error("signature does not match")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid ({0})")]
    Immature(&'static str),
    #[error("the {0} claim is not an integer")]
    NotAnInteger(&'static str),
}

fn mac(secret: &str) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length")
}

/// Signs `claims` with `secret`.
pub fn encode(claims: &Map<String, Value>, secret: &str) -> String {
    let payload = serde_json::to_vec(claims).expect("a JSON object serialises");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let mut mac = mac(secret);
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// Checks `token`'s HS256 signature with `secret` and, when it has one, its
/// `exp` against `now` (unix seconds); answers its claims.
pub fn decode(token: &str, secret: &str, now: i64) -> Result<Map<String, Value>, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(JwtError::Malformed)?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(JwtError::Algorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed)?;
    let mut mac = mac(secret);
    mac.update(&token.as_bytes()[..header_and_payload_len(token)]);
    mac.verify_slice(&signature)
        .map_err(|_| JwtError::Signature)?;
    let claims: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or(JwtError::Malformed)?;
    check_times(&claims, now)?;
    Ok(claims)
}

/// The time claims as PyJWT (what upstream and its workers use) checks
/// them, with no leeway: each that is present must read as an integer
/// (`int(value)` in Python: a number, truncated, or a string of digits);
/// `exp` must be after `now`, `nbf` and `iat` not after it.
fn check_times(claims: &Map<String, Value>, now: i64) -> Result<(), JwtError> {
    let time = |name: &'static str| -> Result<Option<i64>, JwtError> {
        claims
            .get(name)
            .map(|v| python_int(v).ok_or(JwtError::NotAnInteger(name)))
            .transpose()
    };
    if let Some(exp) = time("exp")?
        && exp <= now
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && nbf > now
    {
        return Err(JwtError::Immature("nbf"));
    }
    if let Some(iat) = time("iat")?
        && iat > now
    {
        return Err(JwtError::Immature("iat"));
    }
    Ok(())
}

/// Python's `int(value)` for a JSON value: numbers truncate toward zero,
/// booleans are 0 and 1, a string must be an optionally signed run of
/// digits (surrounding spaces allowed); anything else is not an integer.
fn python_int(value: &Value) -> Option<i64> {
    match value {
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.trunc() as i64)
        }),
        Value::String(s) => {
            let s = s.trim();
            let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        _ => None,
    }
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_signed_token_reads_back_with_its_secret_only() {
        let token = encode(&claims(json!({"id": "c1", "exp": 2000})), "secret-a");
        assert_eq!(decode(&token, "secret-a", 1999).unwrap()["id"], "c1");
        assert_eq!(decode(&token, "secret-b", 1999), Err(JwtError::Signature));
        assert_eq!(decode(&token, "secret-a", 2000), Err(JwtError::Expired));
        let mut tampered = token.clone();
        tampered.insert(token.find('.').unwrap() + 2, 'x');
        assert!(decode(&tampered, "secret-a", 0).is_err());
        assert_eq!(decode("a.b", "secret-a", 0), Err(JwtError::Malformed));
    }

    #[test]
    fn the_signature_matches_a_known_hs256_token() {
        // Computed independently with Python's hmac and hashlib.
        let token = encode(&claims(json!({"sub": "1"})), "k");
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.\
             q9rSPf4ratZ1Xkhd3M-FudlLIKYdlSzrHeXV7AICSuw"
        );
        assert!(decode(&token, "k", 0).is_ok());
    }

    #[test]
    fn time_claims_are_checked_as_pyjwt_checks_them() {
        let verdict = |c: Value| decode(&encode(&claims(c), "k"), "k", 1_000);
        // Measured against PyJWT 2.15 (jwt.decode with HS256 and no leeway).
        assert!(verdict(json!({"nbf": 1_000, "iat": 1_000, "exp": 1_001})).is_ok());
        assert_eq!(
            verdict(json!({"nbf": 1_000 + 86_400})),
            Err(JwtError::Immature("nbf"))
        );
        assert_eq!(
            verdict(json!({"iat": 1_001})),
            Err(JwtError::Immature("iat"))
        );
        assert_eq!(
            verdict(json!({"iat": "yesterday"})),
            Err(JwtError::NotAnInteger("iat"))
        );
        assert_eq!(
            verdict(json!({"iat": null})),
            Err(JwtError::NotAnInteger("iat"))
        );
        assert_eq!(
            verdict(json!({"nbf": [1]})),
            Err(JwtError::NotAnInteger("nbf"))
        );
        assert_eq!(
            verdict(json!({"exp": "soon"})),
            Err(JwtError::NotAnInteger("exp"))
        );
        // Python's int() of a float truncates, and reads a string of digits.
        assert_eq!(verdict(json!({"exp": 1_000.9})), Err(JwtError::Expired));
        assert!(verdict(json!({"exp": 1_001.2, "iat": " 999 "})).is_ok());
    }

    #[test]
    fn other_algorithms_are_refused() {
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"id":"x"}"#)
        );
        assert_eq!(decode(&none, "k", 0), Err(JwtError::Algorithm));
    }
}
