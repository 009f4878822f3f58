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
/// `/v2/proxy/*`).
pub struct Mode(pub Arc<BackendAi>);

/// Backend.AI mode is on and the caller holds the api_secret.
pub struct Authorized(pub Arc<BackendAi>);

/// `POST /v2/conf`'s caller: from an allowed network, or with the exact
/// api_secret. Decided before the body is read.
pub struct ConfCaller(pub Arc<BackendAi>);

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

/// Checks the credentials in `parts` with `verdict`, counting a refusal
/// against the caller's address (429 once it failed too often; a request
/// without any credential is refused without counting).
fn limited(
    parts: &Parts,
    state: &AppState,
    verdict: impl FnOnce(&HeaderMap) -> Result<(), BaiError>,
) -> Result<(), BaiError> {
    let presented = parts.headers.contains_key(TOKEN_HEADER)
        || parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION);
    if !presented {
        return Err(BaiError::auth_failed("Unauthorized access"));
    }
    let peer = crate::api::peer(parts);
    state.admit("backendai", peer, BaiError::too_many_attempts)?;
    verdict(&parts.headers)
        .map_err(|e| state.refused("backendai", peer, e, BaiError::too_many_attempts))
}

impl FromRequestParts<AppState> for Authorized {
    type Rejection = BaiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Authorized, BaiError> {
        let bai = mode(parts, state)?;
        let now = state.clock.now().timestamp();
        limited(parts, state, |headers| {
            check(headers, &bai.settings.secrets.api_secret, now)
        })?;
        Ok(Authorized(bai))
    }
}

impl FromRequestParts<AppState> for ConfCaller {
    type Rejection = BaiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<ConfCaller, BaiError> {
        let bai = mode(parts, state)?;
        let peer = crate::api::peer(parts);
        if on_allowed_network(peer, &bai.settings.conf_allowed_networks) {
            return Ok(ConfCaller(bai));
        }
        limited(parts, state, |headers| {
            check_conf(headers, &bai.settings.secrets.api_secret)
        })?;
        Ok(ConfCaller(bai))
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
        return if secret.matches(given) {
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

/// Whether `peer` is on one of the networks from which `POST /v2/conf`
/// needs no token (the Manager sends none).
pub fn on_allowed_network(peer: Option<std::net::IpAddr>, allowed: &[ipnet::IpNet]) -> bool {
    peer.is_some_and(|ip| allowed.iter().any(|net| net.contains(&ip)))
}

/// `POST /v2/conf` from elsewhere: the api_secret exactly as
/// `X-BackendAI-Token` (no `Bearer` form, no JWT).
pub fn check_conf(headers: &HeaderMap, secret: &Secret) -> Result<(), BaiError> {
    match headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        Some(given) if secret.matches(given) => Ok(()),
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
        assert!(on_allowed_network(manager, &allowed));
        assert!(!on_allowed_network(stranger, &allowed));
        assert!(!on_allowed_network(manager, &[]));
        assert!(!on_allowed_network(None, &allowed));
        let exact = headers(&[(TOKEN_HEADER, SECRET.into())]);
        let bearer = headers(&[(TOKEN_HEADER, format!("Bearer {SECRET}"))]);
        assert!(check_conf(&HeaderMap::new(), &secret).is_err());
        assert!(check_conf(&exact, &secret).is_ok());
        assert!(check_conf(&bearer, &secret).is_err());
    }
}
