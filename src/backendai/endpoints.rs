//! What the Manager's `/v2/endpoints` calls do with inference endpoints:
//! create (or find) an endpoint's circuit and wait for its worker, delete it,
//! edit its replicas, store its model health check, sign its token. The
//! rules they follow (`existing_url`, token claims) are [`super::endpoint`].
//!
//! An endpoint's circuit is an inference route (`endpoint_id` = the
//! deployment id, `service` = its service name, no targets until the Manager
//! registers its replicas), created, placed and logged like any other route.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::circuit::{self, RouteInfo};
use super::circuits::worker_of;
use super::endpoint::{self, UrlPlace};
use super::{BackendAi, Error, jwt};
use crate::clock::Clock;
use crate::domain::{
    Access, AppMode, CircuitInfo, FrontendRequest, Protocol, Route, RouteSpec, Target,
    ValidationError, Worker, WorkerStatus, app_filter,
};
use crate::store::{Store, StoreError};

/// Upstream's answer for a deployment without a circuit.
pub const NO_CIRCUIT: &str = "No circuit registered for this endpoint yet.";

/// What creating one endpoint takes, from either create.
#[derive(Clone, Debug)]
pub struct NewEndpoint {
    pub deployment_id: Uuid,
    pub service_name: String,
    pub user_id: Uuid,
    pub runtime_variant: Option<String>,
    /// A URL the endpoint had: the same worker and frontend keep it.
    pub existing_url: Option<String>,
    pub open_to_public: bool,
    /// The model health check; stored as sent.
    pub health_check: Option<Map<String, Value>>,
    /// What workers' app filters match (`session.<field>`,
    /// `endpoint.<field>`), from the Manager's tags.
    pub properties: BTreeMap<String, String>,
}

/// The endpoint's circuit: the existing one unchanged (moved first if its
/// worker is `Lost`, see [`recover`]), or a new one.
async fn ensure(
    store: &Store,
    clock: &Clock,
    bai: &BackendAi,
    e: NewEndpoint,
) -> Result<(Route, Worker), Error> {
    if let Some((route, worker)) = store.route_by_endpoint(e.deployment_id).await? {
        let worker = match worker {
            Some(w) => w,
            None => worker_of(store, &route).await?,
        };
        if worker.status == WorkerStatus::Lost {
            return recover(store, clock, bai, route).await;
        }
        return Ok((route, worker));
    }
    let deployment_id = e.deployment_id;
    let existing_url = e.existing_url.clone();
    let mut spec = circuit_spec(e);
    if let Some(url) = &existing_url {
        let workers = store.list_workers().await?;
        // Only a worker the app filters let take it keeps the URL.
        let dedicated = app_filter::is_dedicated(&workers, &spec);
        let workers: Vec<Worker> = workers
            .into_iter()
            .filter(|w| app_filter::refusal(w, &spec, dedicated).is_none())
            .collect();
        match endpoint::place_of(url, &workers).map_err(Error::InvalidUrl)? {
            UrlPlace::Subdomain { worker, subdomain } => {
                spec.worker_id = Some(worker);
                spec.frontend.subdomain = Some(subdomain);
            }
            UrlPlace::Port { worker, port } => {
                spec.worker_id = Some(worker);
                spec.frontend.port = Some(port);
            }
            UrlPlace::Anywhere => {}
        }
    }
    let route = match store.create_route(Uuid::now_v7(), spec, clock.now()).await {
        Ok(route) => route,
        // Created concurrently: it is the endpoint's circuit all the same.
        Err(StoreError::Conflict {
            existing: Some(route),
            ..
        }) if route.endpoint_id == Some(deployment_id) => *route,
        Err(e) => return Err(Error::creating(e)),
    };
    let worker = worker_of(store, &route).await?;
    Ok((route, worker))
}

/// The Manager re-syncs an endpoint whose circuit sits on a `Lost` worker:
/// the circuit moves where it is served again, keeping its URL where a
/// worker can ([`crate::domain::recovery::resync`]), and is answered as it is
/// now (the Manager stores the URL it is answered). Where no `Ready` worker
/// can take it, it stays as it was (and the wait for its worker answers
/// `E10001`). A circuit that moved (here, or meanwhile by another re-sync or
/// failover) must be acknowledged anew by its new worker.
async fn recover(
    store: &Store,
    clock: &Clock,
    bai: &BackendAi,
    route: Route,
) -> Result<(Route, Worker), Error> {
    store.resync_circuit(route.id, clock.now()).await?;
    let now = store.get_route(route.id).await?;
    if now.worker_id != route.worker_id {
        bai.acks.forget(&[now.id]);
    }
    let worker = worker_of(store, &now).await?;
    Ok((now, worker))
}

/// A new endpoint's circuit, placed anywhere (its `existing_url` may pin
/// it after).
fn circuit_spec(e: NewEndpoint) -> RouteSpec {
    RouteSpec {
        app_mode: AppMode::Inference,
        session_id: None,
        endpoint_id: Some(e.deployment_id),
        service: e.service_name,
        protocol: Protocol::Http,
        targets: Vec::new(),
        frontend: FrontendRequest::default(),
        worker_id: None,
        access: Access {
            open_to_public: e.open_to_public,
            allowed_client_ips: Vec::new(),
        },
        labels: Default::default(),
        envs: Default::default(),
        args: None,
        health_check: None,
        expires_at: None,
        circuit: Some(CircuitInfo {
            user_id: Some(e.user_id),
            runtime_variant: e.runtime_variant,
            session_ids: Vec::new(),
            app_protocol: None,
            health_check: e.health_check.map(Value::Object),
            properties: e.properties,
        }),
    }
}

/// Where users reach `route` on `worker` (trailing `/`).
fn url_of(route: &Route, worker: &Worker) -> Result<String, Error> {
    circuit::endpoint_url(route, worker)
        .ok_or_else(|| Error::WorkerNotAvailable(format!("circuit {} has no frontend", route.id)))
}

/// Creates (or finds) each endpoint's circuit, waits for the workers to hold
/// the new ones, and answers their URLs in the same order. Each endpoint is
/// committed on its own: a failing one fails the call, and those before it
/// stay created (a retry finds them as they are).
pub async fn create_many(
    store: &Store,
    clock: &Clock,
    bai: &BackendAi,
    endpoints: Vec<NewEndpoint>,
) -> Result<Vec<String>, Error> {
    let mut expected = bai.acks.expect();
    let mut urls = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let (route, worker) = ensure(store, clock, bai, e).await?;
        expected.add(&route, &worker)?;
        urls.push(url_of(&route, &worker)?);
    }
    expected.wait(store, bai.settings.ack_timeout).await?;
    Ok(urls)
}

/// Creates (or finds) one endpoint's circuit, waits for its worker to hold
/// it, and answers its URL.
pub async fn create_one(
    store: &Store,
    clock: &Clock,
    bai: &BackendAi,
    e: NewEndpoint,
) -> Result<String, Error> {
    let mut expected = bai.acks.expect();
    let (route, worker) = ensure(store, clock, bai, e).await?;
    expected.add(&route, &worker)?;
    expected.wait(store, bai.settings.ack_timeout).await?;
    url_of(&route, &worker)
}

/// Deletes the endpoint's circuit; an unknown endpoint is already gone.
pub async fn delete(store: &Store, clock: &Clock, endpoint_id: Uuid) -> Result<(), StoreError> {
    let Some((route, _)) = store.route_by_endpoint(endpoint_id).await? else {
        return Ok(());
    };
    match store.delete_route(route.id, clock.now()).await {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One replica of an endpoint, as the Manager registers it.
#[derive(Clone, Debug)]
pub struct Replica {
    pub session_id: Uuid,
    pub route_id: Uuid,
    pub kernel_host: String,
    /// 1..65535; another value fails its endpoint's item.
    pub kernel_port: i64,
}

/// The target of one replica; `Err` for a port outside 1..65535.
fn target(replica: &Replica) -> Result<Target, StoreError> {
    let port = u16::try_from(replica.kernel_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            StoreError::Invalid(ValidationError {
                field: "kernel_port".into(),
                message: format!("{} is not between 1 and 65535", replica.kernel_port),
            })
        })?;
    Ok(RouteInfo {
        route_id: Some(replica.route_id),
        session_id: replica.session_id,
        session_name: None,
        kernel_host: Some(replica.kernel_host.clone()),
        kernel_port: port,
        protocol: "http".into(),
        traffic_ratio: 1.0,
    }
    .to_target())
}

/// Edits the targets of `endpoint_id`'s circuit; `Err` is the item's error
/// as upstream words it.
async fn edit_targets(
    store: &Store,
    clock: &Clock,
    endpoint_id: Uuid,
    edit: impl FnOnce(&mut Vec<Target>) -> Result<(), StoreError>,
) -> Result<(), String> {
    let Some((route, _)) = store
        .route_by_endpoint(endpoint_id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err(NO_CIRCUIT.to_owned());
    };
    store
        .edit_route(route.id, clock.now(), |spec| edit(&mut spec.targets))
        .await
        .map(|_| ())
        .map_err(|e: StoreError| match e {
            StoreError::NotFound => NO_CIRCUIT.to_owned(),
            e => e.to_string(),
        })
}

/// Replaces the endpoint's replicas; `Err` is the item's error.
pub async fn replace_replicas(
    store: &Store,
    clock: &Clock,
    endpoint_id: Uuid,
    replicas: &[Replica],
) -> Result<(), String> {
    edit_targets(store, clock, endpoint_id, |targets| {
        *targets = replicas.iter().map(target).collect::<Result<_, _>>()?;
        Ok(())
    })
    .await
}

/// Replicas added and those already there (left as they are), by route id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    pub added: Vec<Uuid>,
    pub already: Vec<Uuid>,
}

/// Adds replicas; one whose `route_id` is there already is left as it is.
/// `Err` is the item's error (and nothing was added).
pub async fn register_replicas(
    store: &Store,
    clock: &Clock,
    endpoint_id: Uuid,
    replicas: &[Replica],
) -> Result<Registered, String> {
    let mut registered = Registered::default();
    edit_targets(store, clock, endpoint_id, |targets| {
        for replica in replicas {
            if targets.iter().any(|t| t.id == Some(replica.route_id)) {
                registered.already.push(replica.route_id);
            } else {
                targets.push(target(replica)?);
                registered.added.push(replica.route_id);
            }
        }
        Ok(())
    })
    .await?;
    Ok(registered)
}

/// Replicas removed and those that were not there, by route id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unregistered {
    pub removed: Vec<Uuid>,
    pub absent: Vec<Uuid>,
}

/// Removes replicas by route id. `Err` is the item's error (and nothing was
/// removed).
pub async fn unregister_replicas(
    store: &Store,
    clock: &Clock,
    endpoint_id: Uuid,
    route_ids: &[Uuid],
) -> Result<Unregistered, String> {
    let mut unregistered = Unregistered::default();
    edit_targets(store, clock, endpoint_id, |targets| {
        for id in route_ids {
            let before = targets.len();
            targets.retain(|t| t.id != Some(*id));
            if targets.len() < before {
                unregistered.removed.push(*id);
            } else {
                unregistered.absent.push(*id);
            }
        }
        Ok(())
    })
    .await?;
    Ok(unregistered)
}

/// Stores the endpoint's model health check (`None` clears it; the worker
/// does not run it).
pub async fn set_health_check(
    store: &Store,
    clock: &Clock,
    endpoint_id: Uuid,
    health_check: Option<Map<String, Value>>,
) -> Result<(), Error> {
    let (route, _) = store
        .route_by_endpoint(endpoint_id)
        .await?
        .ok_or_else(|| Error::not_found("circuit"))?;
    store
        .edit_route(route.id, clock.now(), |spec| {
            spec.circuit.get_or_insert_default().health_check = health_check.map(Value::Object);
            Ok::<_, StoreError>(())
        })
        .await?;
    Ok(())
}

/// A token for the endpoint's users, signed with the jwt_secret (the worker
/// checks `id` and `exp`); `exp` as the Manager sends it.
pub async fn token(
    store: &Store,
    bai: &BackendAi,
    endpoint_id: Uuid,
    user: Uuid,
    exp: &Value,
) -> Result<String, Error> {
    let exp = endpoint::parse_exp(exp).map_err(|msg| Error::invalid(&["exp"], msg))?;
    let (route, worker) = store
        .route_by_endpoint(endpoint_id)
        .await?
        .ok_or_else(|| Error::not_found("circuit"))?;
    let worker = match worker {
        Some(w) => w,
        None => worker_of(store, &route).await?,
    };
    let claims = endpoint::token_claims(&route, &worker, user, exp);
    Ok(jwt::encode(
        &claims,
        bai.settings.secrets.jwt_secret.expose(),
    ))
}
