//! The worker side of the protocol, as a library: register, follow the watch
//! stream into a local routing table, acknowledge what was applied with each
//! heartbeat, and after any disconnect resume from the last revision seen.
//!
//! [`Agent::run`] does all of it with reconnects and backoff;
//! [`WorkerClient`] exposes the single calls for callers that want control.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use tokio::sync::watch;
use uuid::Uuid;

use appproxy_core::domain::events::StreamEvent;
use appproxy_core::domain::{Revision, Route, WorkerRegistration};
use appproxy_core::secret::Secret;
use appproxy_core::wire::{Heartbeat, HeartbeatAck, Registration};

/// Selects the TLS implementation (ring) for HTTP clients and servers in
/// this process. Call once at start; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the coordinator answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("bad event on the watch stream: {0}")]
    Stream(String),
}

impl ClientError {
    /// The coordinator no longer knows this worker or its token: register again.
    pub fn needs_registration(&self) -> bool {
        matches!(self, ClientError::Status { status, .. }
            if matches!(*status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND))
    }
}

/// Events from one watch connection.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ClientError>> + Send>>;

/// A registered worker's connection to the coordinator.
#[derive(Clone, Debug)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: String,
    pub worker_id: Uuid,
    token: Secret,
}

async fn checked(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if response.status().is_success() {
        Ok(response)
    } else {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(ClientError::Status { status, body })
    }
}

impl WorkerClient {
    /// A client for an already registered worker whose token the caller kept.
    pub fn new(http: &reqwest::Client, base: &str, worker_id: Uuid, token: &str) -> WorkerClient {
        WorkerClient {
            http: http.clone(),
            base: base.trim_end_matches('/').to_owned(),
            worker_id,
            token: Secret::new(token),
        }
    }

    /// This worker's own token (to re-register with, or to call the API directly).
    pub fn token(&self) -> &Secret {
        &self.token
    }

    /// Registers (or re-registers) with the bootstrap token.
    pub async fn register(
        http: &reqwest::Client,
        base: &str,
        bootstrap_token: &str,
        registration: &WorkerRegistration,
    ) -> Result<(WorkerClient, Registration), ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let response = http
            .post(format!("{base}/workers/register"))
            .bearer_auth(bootstrap_token)
            .json(registration)
            .send()
            .await?;
        let answer: Registration = checked(response).await?.json().await?;
        let client = WorkerClient {
            http: http.clone(),
            base,
            worker_id: answer.worker.id,
            token: Secret::new(answer.token.as_str()),
        };
        Ok((client, answer))
    }

    /// Reports liveness and the last revision applied.
    pub async fn heartbeat(&self, acked_revision: Revision) -> Result<HeartbeatAck, ClientError> {
        let response = self
            .http
            .post(format!(
                "{}/workers/{}/heartbeat",
                self.base, self.worker_id
            ))
            .bearer_auth(self.token.expose())
            .json(&Heartbeat { acked_revision })
            .send()
            .await?;
        Ok(checked(response).await?.json().await?)
    }

    /// Opens the watch stream after `since` (a snapshot first when `None` or
    /// when that revision is no longer in the coordinator's log).
    pub async fn watch(&self, since: Option<Revision>) -> Result<EventStream, ClientError> {
        let mut request = self
            .http
            .get(format!("{}/workers/{}/watch", self.base, self.worker_id))
            .bearer_auth(self.token.expose());
        if let Some(since) = since {
            request = request.query(&[("since", since)]);
        }
        let response = checked(request.send().await?).await?;
        let events = whole_lines(response.bytes_stream())
            .eventsource()
            .map(|item| match item {
                Ok(e) => StreamEvent::parse(&e.event, &e.data).map_err(ClientError::Stream),
                Err(e) => Err(ClientError::Stream(e.to_string())),
            });
        Ok(Box::pin(events))
    }
}

/// `body` re-cut so that every chunk ends at a line end (the last one may
/// not): the event parser scans what it holds for a line end on each chunk,
/// so handing it a multi-megabyte `data:` line (a snapshot) in network-sized
/// pieces would cost it time quadratic in the line's length.
fn whole_lines<S, E>(body: S) -> impl Stream<Item = Result<Bytes, E>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Send,
{
    async_stream::stream! {
        let mut body = std::pin::pin!(body);
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            match chunk.iter().rposition(|&b| b == b'\n' || b == b'\r') {
                None => pending.extend_from_slice(&chunk),
                Some(end) if pending.is_empty() && end + 1 == chunk.len() => yield Ok(chunk),
                Some(end) => {
                    pending.extend_from_slice(&chunk[..=end]);
                    yield Ok(Bytes::from(std::mem::take(&mut pending)));
                    pending.extend_from_slice(&chunk[end + 1..]);
                }
            }
        }
        if !pending.is_empty() {
            yield Ok(Bytes::from(pending));
        }
    }
}

/// The routes a worker serves, as of `revision`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutingTable {
    pub revision: Revision,
    pub routes: BTreeMap<Uuid, Route>,
}

impl RoutingTable {
    pub fn new(revision: Revision, routes: Vec<Route>) -> RoutingTable {
        RoutingTable {
            revision,
            routes: routes.into_iter().map(|r| (r.id, r)).collect(),
        }
    }

    /// Applies one event. Events other than snapshots must come in increasing
    /// revision order; anything else is a protocol violation and an error.
    pub fn apply(&mut self, event: &StreamEvent) -> Result<(), String> {
        let revision = event.revision();
        if !matches!(event, StreamEvent::Snapshot(_)) && revision <= self.revision {
            return Err(format!(
                "{} at revision {revision} after revision {}",
                event.name(),
                self.revision
            ));
        }
        match event {
            StreamEvent::Snapshot(s) => *self = RoutingTable::new(s.revision, s.routes.clone()),
            StreamEvent::Upsert(u) => {
                self.routes.insert(u.route.id, (*u.route).clone());
            }
            StreamEvent::Delete(d) => {
                self.routes.remove(&d.route_id);
            }
            StreamEvent::Bookmark(_) => {}
        }
        self.revision = revision;
        Ok(())
    }
}

/// A worker agent: keeps a [`RoutingTable`] in step with the coordinator.
#[derive(Clone, Debug)]
pub struct Agent {
    pub coordinator: String,
    pub bootstrap_token: Secret,
    pub registration: WorkerRegistration,
    pub heartbeat_interval: Duration,
    /// Longest wait between reconnect attempts (they start at 100 ms and double).
    pub max_backoff: Duration,
}

impl Agent {
    pub fn new(
        coordinator: &str,
        bootstrap_token: &str,
        registration: WorkerRegistration,
    ) -> Agent {
        Agent {
            coordinator: coordinator.to_owned(),
            bootstrap_token: Secret::new(bootstrap_token),
            registration,
            heartbeat_interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Runs until `stop` resolves, publishing the table on every change.
    /// Registration, stream and heartbeat failures are retried with backoff.
    pub async fn run(
        self,
        table: watch::Sender<RoutingTable>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        install_crypto_provider();
        let http = reqwest::Client::new();
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let registered = tokio::select! {
                r = WorkerClient::register(&http, &self.coordinator, self.bootstrap_token.expose(), &self.registration) => r,
                () = &mut stop => return,
            };
            let client = match registered {
                Ok((client, answer)) => {
                    table.send_replace(RoutingTable::new(answer.revision, answer.routes));
                    tracing::info!(worker = %client.worker_id, revision = answer.revision, "registered");
                    client
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    tokio::select! {
                        () = backoff.wait() => continue,
                        () = &mut stop => return,
                    }
                }
            };
            let reason = tokio::select! {
                reason = self.follow(&client, &table, &mut backoff) => reason,
                () = &mut stop => return,
            };
            tracing::info!(reason = %reason, "registering again");
        }
    }

    /// Streams and heartbeats until the coordinator stops knowing us.
    async fn follow(
        &self,
        client: &WorkerClient,
        table: &watch::Sender<RoutingTable>,
        backoff: &mut Backoff,
    ) -> ClientError {
        let mut beats = tokio::time::interval(self.heartbeat_interval);
        loop {
            let since = table.borrow().revision;
            let mut stream = loop {
                tokio::select! {
                    opened = client.watch(Some(since)) => match opened {
                        Ok(s) => break s,
                        Err(e) if e.needs_registration() => return e,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open the watch stream; retrying");
                            backoff.wait().await;
                        }
                    },
                    _ = beats.tick() => {
                        let acked = table.borrow().revision;
                        if let Err(e) = client.heartbeat(acked).await
                            && e.needs_registration()
                        {
                            return e;
                        }
                    }
                }
            };
            backoff.reset();
            loop {
                tokio::select! {
                    next = stream.next() => match next {
                        Some(Ok(event)) => {
                            let mut applied = Ok(());
                            table.send_modify(|t| applied = t.apply(&event));
                            if let Err(e) = applied {
                                tracing::error!(error = %e, "out-of-order event; resuming");
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "watch stream broke; resuming");
                            break;
                        }
                        None => {
                            tracing::info!("watch stream ended; resuming");
                            break;
                        }
                    },
                    _ = beats.tick() => {
                        let acked = table.borrow().revision;
                        match client.heartbeat(acked).await {
                            Err(e) if e.needs_registration() => return e,
                            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                            Ok(_) => {}
                        }
                    }
                }
            }
            backoff.wait().await;
        }
    }
}

/// Waits between reconnect attempts: exponential with jitter, from 100 ms up
/// to a ceiling, never giving up (backon's builder, restarted on success).
struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        let builder = backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            delays: builder.build(),
            max,
        }
    }

    fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    async fn wait(&mut self) {
        // Never exhausted (no limit on attempts); the ceiling is a fallback.
        let delay = self.delays.next().unwrap_or(self.max);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appproxy_core::domain::events::{Bookmark, Delete};

    #[test]
    fn the_table_refuses_repeated_or_older_revisions() {
        let mut t = RoutingTable::new(5, vec![]);
        assert!(
            t.apply(&StreamEvent::Bookmark(Bookmark { revision: 5 }))
                .is_err()
        );
        t.apply(&StreamEvent::Delete(Delete {
            revision: 6,
            route_id: Uuid::nil(),
        }))
        .unwrap();
        assert_eq!(t.revision, 6);
        assert!(
            t.apply(&StreamEvent::Bookmark(Bookmark { revision: 4 }))
                .is_err()
        );
    }
}
