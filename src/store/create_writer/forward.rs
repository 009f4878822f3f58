//! Creates on a replica that does not lead go to the leader's create writer.
//!
//! Every replica can commit creates itself, and that stays the fallback: the
//! revision lock keeps the change log one total order whoever writes. But two
//! writers alternate on that lock, and a batch that follows another
//! replica's must take it the long way (begin, lock, refresh what the other
//! wrote, write, commit) where a writer alone commits a batch in one
//! statement. So a replica that knows another leads sends it its batches
//! (`POST /internal/creates`, one request per batch, with the manager token
//! all replicas share); the leader queues them with its own, one writer
//! commits them all, and each answer comes back as it would have been given
//! here.
//!
//! Who leads, and at which URL, is in the `leader_peer` row: the leader
//! writes it ([`follow`]), the others read it every [`FOLLOW_EVERY`]. A batch
//! the leader could not be sent (refused connection, a refusal before the
//! body was read) is committed here; one whose fate is unknown (the answer
//! never came) is committed here too, after reading which of its routes the
//! leader did create: route ids are fresh UUIDs, so a route with the id is
//! that create's. Nothing acknowledged is lost and nothing is created twice.
//! A received batch is always committed by the receiver, never sent on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::{NewRoute, reply};
use crate::domain::placement::PlacementError;
use crate::domain::validate::ValidationError;
use crate::domain::{Route, RouteSpec};
use crate::secret::Secret;
use crate::store::placer_cache::WorkerCache;
use crate::store::{Db, Result, Store, StoreError, db_time};

/// The leader's endpoint for other replicas' creates.
pub const FORWARD_PATH: &str = "/internal/creates";
/// How often a replica reads who leads (and the leader says it does).
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// Batches a replica has on their way to the leader at once: about one in
/// transit, one queued there, one committing and one answer coming back.
/// What queues meanwhile goes whole in the next (measured: at 16 clients a
/// batch per create with 16, ~5 creates a batch with 2; see BENCHMARKS.md).
pub(super) const IN_FLIGHT: usize = 4;
/// How long a replica waits for the leader to answer a batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a leader could not be reached, how long its URL is not used again
/// (unless the row names another).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One create sent to the leader: the id this replica gave the route, the
/// spec as asked (already validated here, checked again there), and the
/// asking request's trace context, which the route's change carries.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardedCreate {
    pub id: Uuid,
    pub spec: RouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// What became of one forwarded create: the route, or why there is none,
/// in terms that turn back into the same answer the sender would have given.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ForwardedAnswer {
    Created {
        route: Box<Route>,
    },
    NotFound,
    Conflict {
        message: String,
        existing: Option<Box<Route>>,
    },
    NoEligibleWorker {
        message: String,
    },
    UnknownWorker {
        worker: Uuid,
    },
    PortTaken {
        port: u16,
    },
    PinnedWorkerCannotServe {
        message: String,
    },
    Invalid {
        field: String,
        message: String,
    },
    Unavailable {
        message: String,
    },
}

impl From<Result<Route>> for ForwardedAnswer {
    fn from(answer: Result<Route>) -> ForwardedAnswer {
        let e = match answer {
            Ok(route) => {
                return ForwardedAnswer::Created {
                    route: Box::new(route),
                };
            }
            Err(e) => e,
        };
        match e {
            StoreError::NotFound => ForwardedAnswer::NotFound,
            StoreError::Conflict { message, existing } => {
                ForwardedAnswer::Conflict { message, existing }
            }
            StoreError::Placement(PlacementError::NoEligibleWorker(message)) => {
                ForwardedAnswer::NoEligibleWorker { message }
            }
            StoreError::Placement(PlacementError::UnknownWorker(worker)) => {
                ForwardedAnswer::UnknownWorker { worker }
            }
            StoreError::Placement(PlacementError::PortTaken(port)) => {
                ForwardedAnswer::PortTaken { port }
            }
            StoreError::Placement(PlacementError::PinnedWorkerCannotServe(message)) => {
                ForwardedAnswer::PinnedWorkerCannotServe { message }
            }
            StoreError::Invalid(ValidationError { field, message }) => {
                ForwardedAnswer::Invalid { field, message }
            }
            StoreError::Unavailable(message) => ForwardedAnswer::Unavailable { message },
            other => ForwardedAnswer::Unavailable {
                message: other.to_string(),
            },
        }
    }
}

impl From<ForwardedAnswer> for Result<Route> {
    fn from(answer: ForwardedAnswer) -> Result<Route> {
        Err(match answer {
            ForwardedAnswer::Created { route } => return Ok(*route),
            ForwardedAnswer::NotFound => StoreError::NotFound,
            ForwardedAnswer::Conflict { message, existing } => {
                StoreError::Conflict { message, existing }
            }
            ForwardedAnswer::NoEligibleWorker { message } => {
                PlacementError::NoEligibleWorker(message).into()
            }
            ForwardedAnswer::UnknownWorker { worker } => {
                PlacementError::UnknownWorker(worker).into()
            }
            ForwardedAnswer::PortTaken { port } => PlacementError::PortTaken(port).into(),
            ForwardedAnswer::PinnedWorkerCannotServe { message } => {
                PlacementError::PinnedWorkerCannotServe(message).into()
            }
            ForwardedAnswer::Invalid { field, message } => {
                ValidationError { field, message }.into()
            }
            ForwardedAnswer::Unavailable { message } => StoreError::Unavailable(message),
        })
    }
}

/// `appproxy_create_forwards{outcome}`: creates this replica sent to the
/// leader and what became of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// `answered` (by the leader), `not_sent` (committed here: the leader
    /// could not be reached or refused the batch), `unknown` (no answer:
    /// committed here after reading which the leader created).
    pub outcome: &'static str,
}

/// How this replica reaches the leader: installed on a PostgreSQL store at
/// start ([`Store::forward_creates`]); the URL is kept current by [`follow`].
#[derive(Debug)]
pub struct Peers {
    /// This process among the replicas (the `leader_peer.replica` it writes).
    replica: Uuid,
    client: reqwest::Client,
    /// The manager token, which every replica of one installation shares.
    token: Secret,
    /// The largest body a replica reads (`max_body_bytes`, the same on all):
    /// a batch is sent in requests no larger.
    max_body: usize,
    /// The leader's URL while another replica leads and takes creates.
    leader: watch::Sender<Option<String>>,
    /// A leader URL that could not be reached, and when.
    failed: Mutex<Option<(String, tokio::time::Instant)>>,
}

impl Peers {
    /// `roots`: certificates to trust besides the platform's, for a leader
    /// serving HTTPS (the replicas' own, from `tls_cert`).
    pub fn new(
        token: Secret,
        max_body: usize,
        roots: Vec<reqwest::Certificate>,
    ) -> anyhow::Result<Peers> {
        let mut client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ANSWER_TIMEOUT)
            .tcp_nodelay(true);
        for root in roots {
            client = client.add_root_certificate(root);
        }
        let client = client.build()?;
        Ok(Peers {
            replica: Uuid::new_v4(),
            client,
            token,
            max_body,
            leader: watch::channel(None).0,
            failed: Mutex::new(None),
        })
    }

    /// Where to send creates now: `None` while this replica leads, no leader
    /// takes creates, or the leader could not be reached a moment ago.
    pub(super) fn target(&self) -> Option<String> {
        self.leader.borrow().clone()
    }

    /// Sets the leader's URL as read from the row (`None`: send nothing).
    fn set_leader(&self, url: Option<String>) {
        let url = url.filter(|url| {
            let failed = self.failed.lock().expect("not poisoned");
            !matches!(&*failed, Some((f, at)) if f == url && at.elapsed() < RETRY_AFTER)
        });
        self.leader.send_if_modified(|now| {
            let changed = *now != url;
            match (&url, changed) {
                (Some(leader), true) => {
                    tracing::info!(%leader, "sending route creates to the leader");
                }
                (None, true) => tracing::info!("committing route creates here"),
                (_, false) => {}
            }
            *now = url;
            changed
        });
    }

    /// Stops sending to `url` for [`RETRY_AFTER`].
    fn unreachable(&self, url: &str) {
        *self.failed.lock().expect("not poisoned") =
            Some((url.to_owned(), tokio::time::Instant::now()));
        self.leader
            .send_if_modified(|now| now.take_if(|now| now == url).is_some());
    }

    /// Sends `items` to the leader at `url`, in requests of at most
    /// `max_body` bytes. Stops at the first request that fails.
    async fn send(&self, url: &str, items: &[ForwardedCreate]) -> Sent {
        let mut answers = Vec::with_capacity(items.len());
        for chunk in chunks(items, self.max_body) {
            match self.send_chunk(url, chunk).await {
                Sent::Answered(a) => answers.extend(a),
                failed => return failed.after(answers),
            }
        }
        Sent::Answered(answers)
    }

    async fn send_chunk(&self, url: &str, items: &[ForwardedCreate]) -> Sent {
        let response = self
            .client
            .post(format!("{url}{FORWARD_PATH}"))
            .bearer_auth(self.token.expose())
            .json(items)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            // With its causes: reqwest's own words are "error sending request".
            Err(e) if e.is_connect() => {
                return Sent::NotTaken(Vec::new(), format!("{:#}", anyhow::Error::from(e)));
            }
            Err(e) => return Sent::Unknown(Vec::new(), format!("{:#}", anyhow::Error::from(e))),
        };
        let status = response.status();
        if status.is_client_error() {
            // Refused as a whole (credentials, size, shape): nothing created.
            let body = response.text().await.unwrap_or_default();
            return Sent::NotTaken(Vec::new(), format!("{status}: {body}"));
        }
        if !status.is_success() {
            return Sent::Unknown(Vec::new(), format!("{status}"));
        }
        match response.json::<Vec<ForwardedAnswer>>().await {
            Ok(a) if a.len() == items.len() => Sent::Answered(a),
            Ok(a) => Sent::Unknown(
                Vec::new(),
                format!("{} answers to {} creates", a.len(), items.len()),
            ),
            Err(e) => Sent::Unknown(Vec::new(), e.to_string()),
        }
    }
}

/// What sending a batch came to. A failure carries the answers of the
/// requests before it (the batch's first creates) and what went wrong.
enum Sent {
    Answered(Vec<ForwardedAnswer>),
    NotTaken(Vec<ForwardedAnswer>, String),
    Unknown(Vec<ForwardedAnswer>, String),
}

impl Sent {
    fn after(self, mut before: Vec<ForwardedAnswer>) -> Sent {
        match self {
            Sent::Answered(a) => {
                before.extend(a);
                Sent::Answered(before)
            }
            Sent::NotTaken(a, why) => {
                before.extend(a);
                Sent::NotTaken(before, why)
            }
            Sent::Unknown(a, why) => {
                before.extend(a);
                Sent::Unknown(before, why)
            }
        }
    }
}

/// `items` in runs whose JSON stays within `max_body` bytes (a create
/// larger than that alone goes alone, and the leader refuses it: it is then
/// committed here).
fn chunks(items: &[ForwardedCreate], max_body: usize) -> Vec<&[ForwardedCreate]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 2);
    for (i, item) in items.iter().enumerate() {
        let len = serde_json::to_vec(item).map_or(0, |v| v.len()) + 1;
        if i > start && size + len > max_body {
            out.push(&items[start..i]);
            (start, size) = (i, 2);
        }
        size += len;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

impl Store {
    /// Sends this replica's creates to the leader whenever another replica
    /// leads (PostgreSQL only; see [`follow`]). Once, at start.
    pub fn forward_creates(&self, peers: Peers) {
        if matches!(self.db, Db::Postgres(_)) {
            let _ = self.peers.set(Arc::new(peers));
        }
    }

    /// The leader and its URL, when another replica leads and takes creates.
    pub(super) fn forward_target(&self) -> Option<(Arc<Peers>, String)> {
        let peers = self.peers.get()?;
        peers.target().map(|url| (peers.clone(), url))
    }

    /// Commits creates another replica sent (`POST /internal/creates`) with
    /// this replica's own, never sending them on. One answer per item.
    pub async fn create_forwarded(
        &self,
        items: Vec<ForwardedCreate>,
        now: DateTime<Utc>,
    ) -> Vec<ForwardedAnswer> {
        let now = db_time(now);
        let answers = items.into_iter().map(|item| async move {
            // Only a well-formed trace context goes on into the bus events.
            let trace = item
                .trace
                .filter(|t| crate::trace_context::parse(t).is_some());
            self.create_here(item.id, item.spec, now, trace)
                .await
                .into()
        });
        futures::future::join_all(answers).await
    }

    /// Sends `requests` to the leader at `url` and answers them with what it
    /// says; commits here what it could not be sent, or what it may not
    /// have received (see the module).
    pub(super) async fn forward_batch(&self, peers: &Peers, url: &str, requests: Vec<NewRoute>) {
        let span = tracing::info_span!(parent: None, "forward_creates", size = requests.len(), leader = %url);
        for r in &requests {
            span.follows_from(&r.span);
        }
        let items: Vec<ForwardedCreate> = requests
            .iter()
            .map(|r| ForwardedCreate {
                id: r.id,
                spec: r.spec.clone(),
                trace: r.trace.clone(),
            })
            .collect();
        let sent = peers.send(url, &items).instrument(span.clone()).await;
        let (answered, rest_from, why, known) = match sent {
            Sent::Answered(a) => (a, requests.len(), String::new(), true),
            Sent::NotTaken(a, why) => (a.clone(), a.len(), why, true),
            Sent::Unknown(a, why) => (a.clone(), a.len(), why, false),
        };
        self.forwards(if known { "answered" } else { "unknown" }, answered.len());
        let mut answers: Vec<Result<Route>> = answered.into_iter().map(Into::into).collect();
        if rest_from < requests.len() {
            let _in_span = span.enter();
            tracing::warn!(leader = %url, error = %why, "the leader did not take route creates; committing them here");
            peers.unreachable(url);
            drop(_in_span);
            let rest = &requests[rest_from..];
            self.forwards(if known { "not_sent" } else { "unknown" }, rest.len());
            let here = if known {
                self.commit_here(rest).instrument(span.clone()).await
            } else {
                self.commit_unknown(rest).instrument(span.clone()).await
            };
            answers.extend(here);
        }
        reply(requests, answers, &span);
    }

    fn forwards(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.create_forwards
                .get_or_create(&ForwardLabels { outcome })
                .inc_by(n as u64);
        }
    }

    /// Commits `requests` here, the locked way.
    async fn commit_here(&self, requests: &[NewRoute]) -> Vec<Result<Route>> {
        self.create_batches.observe(requests.len() as f64);
        self.commit_batch(requests, &mut WorkerCache::default())
            .await
    }

    /// Commits `requests` here, but answers those the leader did create
    /// (a route with the request's id exists, before or after the commit
    /// here tried) with that route. One at a time: this is the rare way.
    async fn commit_unknown(&self, requests: &[NewRoute]) -> Vec<Result<Route>> {
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            let answer = match self.get_route(r.id).await {
                Err(StoreError::NotFound) => {
                    self.create_batches.observe(1.0);
                    let mut here = self
                        .commit_batch(std::slice::from_ref(r), &mut WorkerCache::default())
                        .await;
                    match here.pop().unwrap_or(Err(StoreError::NotFound)) {
                        // The leader's commit came in between.
                        Err(conflict @ StoreError::Conflict { .. }) => {
                            self.get_route(r.id).await.map_err(|_| conflict)
                        }
                        other => other,
                    }
                }
                found => found,
            };
            answers.push(answer);
        }
        answers
    }

    /// Writes this replica as the leader in `leader_peer`, reachable at
    /// `url` (`None`: it takes no creates). Writes only when that changes.
    async fn claim_leader_peer(&self, replica: Uuid, url: Option<&str>) -> Result<()> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO leader_peer (id, replica, peer_url, since) VALUES (1, $1, $2, now()) \
             ON CONFLICT (id) DO UPDATE SET replica = $1, peer_url = $2, since = now() \
             WHERE leader_peer.replica IS DISTINCT FROM $1 OR leader_peer.peer_url IS DISTINCT FROM $2",
        )
        .bind(replica)
        .bind(url)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The replica `leader_peer` names, and its URL.
    async fn leader_peer(&self) -> Result<Option<(Uuid, Option<String>)>> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        Ok(
            sqlx::query_as("SELECT replica, peer_url FROM leader_peer WHERE id = 1")
                .fetch_optional(pool)
                .await?,
        )
    }
}

/// Keeps the store's idea of the leader current, every [`FOLLOW_EVERY`] until
/// `stop` resolves: while `leading()` says this replica leads, it writes
/// itself into `leader_peer` with `own_url` (where the others reach it;
/// `None`: they keep committing their own creates) and sends nothing on;
/// otherwise it reads who leads and sends its creates there.
pub async fn follow(
    store: Store,
    own_url: Option<String>,
    leading: impl Fn() -> bool + Send,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let Some(peers) = store.peers.get().cloned() else {
        return;
    };
    tokio::pin!(stop);
    loop {
        let read = if leading() {
            store
                .claim_leader_peer(peers.replica, own_url.as_deref())
                .await
                .map(|()| None)
        } else {
            store.leader_peer().await.map(|row| match row {
                Some((replica, url)) if replica != peers.replica => url,
                _ => None,
            })
        };
        match read {
            Ok(url) => peers.set_leader(url),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read which replica leads; committing creates here");
                peers.set_leader(None);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            () = &mut stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name_len: usize) -> ForwardedCreate {
        let spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "session_id": Uuid::nil(),
            "service": "x".repeat(name_len),
            "targets": [{"host": "10.0.1.7", "port": 8888}],
        }))
        .unwrap();
        ForwardedCreate {
            id: Uuid::nil(),
            spec,
            trace: None,
        }
    }

    #[test]
    fn a_batch_goes_in_requests_no_larger_than_a_body_may_be() {
        let items: Vec<_> = (0..10).map(|_| item(40)).collect();
        let one = serde_json::to_vec(&items[0]).unwrap().len();
        // Three items' JSON fit (with brackets and commas), four do not.
        let limit = 3 * (one + 1) + 2;
        let runs = chunks(&items, limit);
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        for run in runs {
            assert!(serde_json::to_vec(run).unwrap().len() <= limit);
        }
        // One create larger than the limit goes alone (and is refused there).
        let big = [item(10), item(500), item(10)];
        assert_eq!(
            chunks(&big, 200)
                .iter()
                .map(|r| r.len())
                .collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert_eq!(chunks(&[], 200).len(), 0);
    }

    #[test]
    fn every_answer_comes_back_as_the_same_error() {
        let answers: Vec<Result<Route>> = vec![
            Err(StoreError::NotFound),
            Err(StoreError::Conflict {
                message: "session already has a jupyter route".into(),
                existing: None,
            }),
            Err(PlacementError::NoEligibleWorker("none ready".into()).into()),
            Err(PlacementError::UnknownWorker(Uuid::nil()).into()),
            Err(PlacementError::PortTaken(30001).into()),
            Err(PlacementError::PinnedWorkerCannotServe("tcp only".into()).into()),
            Err(ValidationError {
                field: "service".into(),
                message: "empty".into(),
            }
            .into()),
            Err(StoreError::Unavailable("down".into())),
        ];
        for answer in answers {
            let shown = format!("{answer:?}");
            let wire = serde_json::to_value(ForwardedAnswer::from(answer)).unwrap();
            let back: ForwardedAnswer = serde_json::from_value(wire).unwrap();
            assert_eq!(format!("{:?}", Result::<Route>::from(back)), shown);
        }
    }
}
