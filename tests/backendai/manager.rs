//! The Manager's side: `/status`, `/v2`, `/health`, on both backends.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{Backend, TestApp, manual_clock};
use crate::on_both_backends;

on_both_backends!(status_reports_the_api_version_and_the_advertised_address,);

async fn status_reports_the_api_version_and_the_advertised_address(b: Backend) {
    let app = TestApp::start_backendai(b, manual_clock()).await;
    let a = app.call(Method::GET, "/status", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"api_version": "v2", "advertise_address": "http://coordinator.test:10200"})
    );

    // Without Backend.AI mode the path is not served, in upstream's shape.
    let off = TestApp::start(b).await;
    let a = off.call(Method::GET, "/status", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["type"], "https://api.backend.ai/probs/url-not-found");
    assert_eq!(a.body["data"], "/status");
}
