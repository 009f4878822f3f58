//! Who may call the Backend.AI paths, exactly as upstream decides it: the
//! Manager and the workers share one api_secret, sent as
//! `X-BackendAI-Token: <secret>` (also `Bearer <secret>` or
//! `BackendAI <secret>`), or as `Authorization: Bearer <JWT signed with the
//! secret>`. A present `X-BackendAI-Token` that is wrong fails even with a
//! valid `Authorization`.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::BaiError;
use crate::api::AppState;
use crate::backendai::{BackendAi, jwt};
use crate::secret::Secret;

/// Header the Manager and the workers send the api_secret in.
pub const TOKEN_HEADER: &str = "x-backendai-token";

/// Backend.AI mode is on; no credentials needed (`/status`, `/health`,
/// `/v2/proxy/*`, and `/v2/conf`, which checks its own).
pub struct Mode(pub Arc<BackendAi>);

/// Backend.AI mode is on and the caller holds the api_secret.
pub struct Authorized(pub Arc<BackendAi>);

fn mode(parts: &Parts, state: &AppState) -> Result<Arc<BackendAi>, BaiError> {
    state
        .backendai
        .clone()
        .ok_or_else(|| BaiError::mode_off(parts.uri.path()))
}

impl FromRequestParts<AppState> for Mode {
    type Rejection = BaiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Mode, BaiError> {
        mode(parts, state).map(Mode)
    }
}

impl FromRequestParts<AppState> for Authorized {
    type Rejection = BaiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Authorized, BaiError> {
        let bai = mode(parts, state)?;
        check(
            &parts.headers,
            &bai.settings.secrets.api_secret,
            state.clock.now().timestamp(),
        )?;
        Ok(Authorized(bai))
    }
}

/// Upstream's `auth_required`: `Ok` when `headers` carry the api_secret.
pub fn check(headers: &HeaderMap, secret: &Secret, now: i64) -> Result<(), BaiError> {
    if let Some(value) = headers.get(TOKEN_HEADER) {
        let value = value.to_str().unwrap_or_default();
        let given = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("BackendAI "))
            .unwrap_or(value);
        return if Secret::new(given) == *secret {
            Ok(())
        } else {
            Err(BaiError::auth_failed("Unauthorized access"))
        };
    }
    let Some(authorization) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(BaiError::auth_failed("Unauthorized access"));
    };
    let authorization = authorization.to_str().unwrap_or_default();
    let (scheme, token) = authorization.split_once(' ').unwrap_or((authorization, ""));
    if scheme != "Bearer" {
        return Err(BaiError::auth_failed(format!(
            "Unsupported authorization method {scheme}"
        )));
    }
    jwt::decode(token.trim(), secret.expose(), now)
        .map(|_| ())
        .map_err(|_| BaiError::auth_failed("Unauthorized access"))
}

/// The address the request came from (the TCP peer), when the server
/// serves with connect info.
pub struct Peer(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Peer, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip().to_canonical()),
        ))
    }
}

/// `POST /v2/conf`: the api_secret exactly as `X-BackendAI-Token` (no
/// `Bearer` form, no JWT), unless the caller's address is in
/// `allowed` (the Manager sends no token at all).
pub fn check_conf(
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    secret: &Secret,
    allowed: &[ipnet::IpNet],
) -> Result<(), BaiError> {
    if let Some(ip) = peer
        && allowed.iter().any(|net| net.contains(&ip))
    {
        return Ok(());
    }
    match headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        Some(given) if Secret::new(given) == *secret => Ok(()),
        _ => Err(BaiError::auth_failed("Unauthorized access")),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    const SECRET: &str = "api-secret-of-the-installation";

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn verdict(pairs: &[(&'static str, String)]) -> Result<(), String> {
        check(&headers(pairs), &Secret::new(SECRET), 1_000).map_err(|e| e.msg.unwrap_or_default())
    }

    #[test]
    fn the_token_header_takes_three_forms_and_wins_over_authorization() {
        let jwt = jwt::encode(json!({"sub": "m"}).as_object().unwrap(), SECRET);
        for form in [
            SECRET.to_owned(),
            format!("Bearer {SECRET}"),
            format!("BackendAI {SECRET}"),
        ] {
            assert_eq!(verdict(&[(TOKEN_HEADER, form)]), Ok(()));
        }
        assert!(verdict(&[(TOKEN_HEADER, "wrong".into())]).is_err());
        assert!(
            verdict(&[
                (TOKEN_HEADER, "wrong".into()),
                ("authorization", format!("Bearer {jwt}"))
            ])
            .is_err()
        );
    }

    #[test]
    fn a_bearer_jwt_signed_with_the_secret_is_accepted_until_it_expires() {
        let ok = jwt::encode(json!({"exp": 1_001}).as_object().unwrap(), SECRET);
        let expired = jwt::encode(json!({"exp": 1_000}).as_object().unwrap(), SECRET);
        let foreign = jwt::encode(json!({}).as_object().unwrap(), "another-secret");
        assert_eq!(
            verdict(&[("authorization", format!("Bearer {ok}"))]),
            Ok(())
        );
        assert!(verdict(&[("authorization", format!("Bearer {expired}"))]).is_err());
        assert!(verdict(&[("authorization", format!("Bearer {foreign}"))]).is_err());
        assert_eq!(
            verdict(&[("authorization", format!("Basic {ok}"))]),
            Err("Unsupported authorization method Basic".into())
        );
        assert_eq!(verdict(&[]), Err("Unauthorized access".into()));
    }

    #[test]
    fn conf_needs_the_exact_secret_unless_the_caller_is_on_an_allowed_network() {
        let secret = Secret::new(SECRET);
        let allowed: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let manager = Some("10.1.2.3".parse().unwrap());
        let stranger = Some("192.0.2.1".parse().unwrap());
        assert!(check_conf(&HeaderMap::new(), manager, &secret, &allowed).is_ok());
        assert!(check_conf(&HeaderMap::new(), stranger, &secret, &allowed).is_err());
        assert!(check_conf(&HeaderMap::new(), manager, &secret, &[]).is_err());
        let exact = headers(&[(TOKEN_HEADER, SECRET.into())]);
        let bearer = headers(&[(TOKEN_HEADER, format!("Bearer {SECRET}"))]);
        assert!(check_conf(&exact, stranger, &secret, &allowed).is_ok());
        assert!(check_conf(&bearer, stranger, &secret, &allowed).is_err());
    }
}
