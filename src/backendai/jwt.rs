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
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_f64().ok_or(JwtError::Malformed)?;
        if (now as f64) >= exp {
            return Err(JwtError::Expired);
        }
    }
    Ok(claims)
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
    fn other_algorithms_are_refused() {
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"id":"x"}"#)
        );
        assert_eq!(decode(&none, "k", 0), Err(JwtError::Algorithm));
    }
}
