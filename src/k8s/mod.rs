//! Kubernetes mode: the `AppProxyRoute` CRD and its mirror, worker-pod
//! health, Lease leader election and Events.
//!
//! - [`crd`]: the custom resource type (and `crdgen`).
//! - [`plan`]: the pure diff of routes against CRs, status derivation, pacing.
//! - [`mirror`]: the controller that writes the CRs (leader only).
//! - [`pods`]: worker pods → [`crate::health::observe`] (leader only).
//! - [`lease`]: a `coordination.k8s.io/v1` Lease [`Elector`](crate::leader::Elector).
//! - [`events`]: `events.k8s.io/v1` Events on the CRs.
//!
//! Outside Kubernetes none of this runs.

pub mod crd;
pub mod events;
pub mod lease;
pub mod mirror;
pub mod plan;
pub mod pods;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::hub::Hub;
use crate::leader::{self, Leadership};

/// Everything Kubernetes mode needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub worker_selector: String,
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    pub identity: String,
    /// How long the Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and others retry).
    pub renew_every: Duration,
    pub mirror: mirror::MirrorConfig,
}

impl Settings {
    /// Settings for `namespace`, with production timings.
    pub fn new(
        namespace: &str,
        identity: &str,
        worker_selector: &str,
        lease_name: &str,
    ) -> Settings {
        Settings {
            namespace: namespace.to_owned(),
            worker_selector: worker_selector.to_owned(),
            lease_name: lease_name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            mirror: mirror::MirrorConfig::new(namespace),
        }
    }
}

/// A client from the environment: the in-cluster service account, or a kubeconfig.
pub async fn client() -> anyhow::Result<kube::Client> {
    client_from(kube::Config::infer().await?)
}

/// What the coordinator tells the API server it is (`User-Agent`).
pub const USER_AGENT: &str = concat!("appproxy-coordinator/", env!("CARGO_PKG_VERSION"));

/// A client for `config`, sending [`USER_AGENT`] with every request.
pub fn client_from(mut config: kube::Config) -> anyhow::Result<kube::Client> {
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    Ok(kube::Client::try_from(config)?)
}

/// Kubernetes mode, running.
pub struct Running {
    pub leadership: Leadership,
    released: Arc<Notify>,
}

impl Running {
    /// Waits (at most `limit`) for the Lease to be released after shutdown.
    pub async fn released(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.released.notified()).await;
    }
}

/// Starts Lease election; while this replica leads, the CR mirror and the
/// worker-pod watcher run. `shutdown` ends the election and releases the Lease.
/// The Lease's renewals and expiry, and pod observations, read `clock`.
pub fn start(
    client: kube::Client,
    settings: Settings,
    hub: Hub,
    clock: Clock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Running {
    let elector = lease::LeaseElector::new(
        Api::namespaced(client.clone(), &settings.namespace),
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
        clock.clone(),
    );
    let released = elector.released();
    let leadership = leader::spawn(elector, settings.renew_every, shutdown);
    let ctx = hub.context(clock, leadership.clone());
    let recorder = events::Recorder::new(client.clone(), &settings.namespace, &settings.identity);
    let mirror = (client.clone(), hub, recorder, settings.mirror.clone());
    tokio::spawn({
        let ctx = ctx.clone();
        async move {
            ctx.while_leading("mirror", mirror, |(client, hub, recorder, config), stop| {
                Box::pin(mirror::run(
                    client.clone(),
                    hub.clone(),
                    recorder.clone(),
                    config.clone(),
                    stop,
                ))
            })
            .await
        }
    });
    let pods = (
        client,
        settings.namespace.clone(),
        settings.worker_selector.clone(),
        ctx.clone(),
    );
    tokio::spawn(async move {
        ctx.while_leading("pod watcher", pods, |(client, ns, selector, ctx), stop| {
            Box::pin(async move {
                tokio::select! {
                    () = pods::watch(client.clone(), ns, selector, ctx.store.clone(), ctx.clock.clone()) => {}
                    () = stop => {}
                }
                Ok(())
            })
        })
        .await
    });
    Running {
        leadership,
        released,
    }
}
