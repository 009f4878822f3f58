//! The mirror's writes: planning them from what the routes say and what the
//! CRs hold ([`Mirror::reconcile`]), making them beside the loop, paced and
//! bounded ([`Job`]), and taking their outcome ([`Mirror::done`]): the
//! per-CR retry backoff, the Events recorded once a CR exists.

use super::*;

impl Mirror {
    /// Starts one batch of the plan's writes (skipping CRs with a write under
    /// way or backing off); true when more could be started right away.
    pub(super) fn reconcile(
        &mut self,
        writes: &mut futures::stream::FuturesUnordered<Write>,
    ) -> bool {
        let desired = plan::desired(&self.routes, &self.workers);
        let now = tokio::time::Instant::now();
        let room = self.config.batch_size.saturating_sub(self.in_flight.len());
        let actions: Vec<Action> = plan::plan(&desired, &self.observed)
            .into_iter()
            .filter(|a| !self.in_flight.contains(a.name()))
            .filter(|a| {
                self.failing.get(a.name()).is_none_or(|f| {
                    f.retry_at <= now
                        || f.action != *a
                        || f.desired.as_ref() != desired.get(a.name())
                })
            })
            .collect();
        let mut actions = actions.into_iter().peekable();
        let mut started = 0;
        while started < room {
            let Some(action) = actions.next() else { break };
            let name = action.name().to_owned();
            let observed = self.observed.get(&name).cloned();
            let repair = match (&action, self.written.get(&name)) {
                (Action::Create(_), Some(_)) => Some(Reason::Restored),
                (Action::ApplySpec(_), Some(last))
                    if observed.as_ref().and_then(|o| o.spec.as_ref()) != Some(last) =>
                {
                    Some(Reason::DriftRepaired)
                }
                _ => None,
            };
            let job = Job {
                desired: desired.get(&name).cloned(),
                action,
                observed,
                repair,
            };
            let (api, limiter, permits, limit) = (
                self.api.clone(),
                self.limiter.clone(),
                self.permits.clone(),
                self.config.call_timeout,
            );
            self.in_flight.insert(name);
            writes.push(Box::pin(async move {
                let _permit = permits.acquire_owned().await;
                let result = job.run(&api, &limiter, limit).await;
                (job, result)
            }));
            started += 1;
        }
        if started > 0 {
            tracing::debug!(writes = started, "mirroring routes to AppProxyRoutes");
        }
        started == room && actions.peek().is_some()
    }

    /// Takes in the outcome of one write.
    pub(super) fn done(&mut self, job: Job, result: anyhow::Result<Option<AppProxyRoute>>) {
        let name = job.action.name().to_owned();
        self.in_flight.remove(&name);
        match result {
            Ok(Some(cr)) => {
                self.failing.remove(&name);
                if let Some(d) = &job.desired {
                    let placed = matches!(job.action, Action::Create(_)) && job.repair.is_none();
                    if let (true, Some(worker)) = (placed, &d.status.worker) {
                        let url = d.spec.frontend.url.as_deref().unwrap_or("-");
                        self.events.entry(name.clone()).or_default().push((
                            Reason::Placed,
                            format!("placed on worker {worker} at {url}"),
                        ));
                    }
                    self.written.insert(name.clone(), d.spec.clone());
                }
                // The CR went out of the managed selection, but not away: its
                // managed-by label was removed, and the apply put it back.
                let relabelled =
                    cr.metadata.uid.is_some() && cr.metadata.uid.as_ref() == self.uids.get(&name);
                let repair = match job.repair {
                    Some(Reason::Restored) if relabelled => Some((
                        Reason::DriftRepaired,
                        "managed-by label removed by hand; restored",
                    )),
                    Some(Reason::Restored) => Some((
                        Reason::Restored,
                        "deleted by hand; recreated from the coordinator's database",
                    )),
                    Some(r) => Some((
                        r,
                        "spec edited by hand; reverted to the coordinator's database",
                    )),
                    None => None,
                };
                if let Some(uid) = &cr.metadata.uid {
                    self.uids.insert(name.clone(), uid.clone());
                }
                if let Some((reason, note)) = repair {
                    tracing::info!(cr = %name, reason = reason.as_str(), "repaired an AppProxyRoute");
                    if let Some(board) = &self.config.repairs {
                        board.record(crate::status::Activity {
                            at: chrono::Utc::now(),
                            kind: match reason {
                                Reason::Restored => "restored",
                                _ => "drift-repaired",
                            },
                            route_id: route_id_of(&name),
                            text: format!("AppProxyRoute {name}: {note}"),
                        });
                    }
                    self.events
                        .entry(name.clone())
                        .or_default()
                        .push((reason, note.to_owned()));
                }
                self.observed.insert(name, observed_of(&cr));
            }
            Ok(None) => {
                self.failing.remove(&name);
                self.observed.remove(&name);
                self.written.remove(&name);
                self.uids.remove(&name);
                self.events.remove(&name);
                if let Some(id) = route_id_of(&name) {
                    self.departed.remove(&id);
                }
            }
            Err(e) => {
                let same = self
                    .failing
                    .get(&name)
                    .is_some_and(|f| f.action == job.action && f.desired == job.desired);
                if !same {
                    tracing::warn!(cr = %name, error = %e, "cannot write an AppProxyRoute; backing off");
                    let delays = backon::ExponentialBuilder::new()
                        .with_min_delay(self.config.retry_min)
                        .with_max_delay(self.config.retry_max)
                        .without_max_times()
                        .build();
                    self.failing.insert(
                        name.clone(),
                        Failing {
                            action: job.action.clone(),
                            desired: job.desired.clone(),
                            retry_at: tokio::time::Instant::now(),
                            delays,
                        },
                    );
                }
                let f = self.failing.get_mut(&name).expect("inserted above");
                let delay = f.delays.next().unwrap_or(self.config.retry_max);
                f.retry_at = tokio::time::Instant::now() + delay;
                if same {
                    tracing::debug!(cr = %name, error = %e, ?delay, "still cannot write an AppProxyRoute");
                }
            }
        }
    }

    pub(super) async fn flush_events(&mut self) {
        let ready: Vec<String> = self
            .events
            .keys()
            .filter(|n| self.observed.contains_key(*n))
            .cloned()
            .collect();
        for name in ready {
            let uid = self.observed.get(&name).and_then(|o| o.uid.clone());
            for (reason, note) in self.events.remove(&name).unwrap_or_default() {
                let wait = self.limiter.lock().expect("limiter").take(Instant::now());
                tokio::time::sleep(wait).await;
                let record = self.recorder.record(&name, uid.as_deref(), reason, &note);
                if tokio::time::timeout(self.config.call_timeout, record)
                    .await
                    .is_err()
                {
                    tracing::warn!(cr = %name, reason = reason.as_str(), "recording an event timed out");
                }
            }
        }
    }
}

/// One write of a batch, with everything it needs owned.
pub(super) struct Job {
    action: Action,
    desired: Option<Desired>,
    observed: Option<Observed>,
    repair: Option<Reason>,
}

impl Job {
    /// The CR after the write, or `None` once deleted.
    #[tracing::instrument(
        level = "debug",
        name = "mirror_write",
        skip_all,
        fields(cr = %self.action.name(), action = action_kind(&self.action))
    )]
    async fn run(
        &self,
        api: &Api<AppProxyRoute>,
        limiter: &Mutex<TokenBucket>,
        limit: Duration,
    ) -> anyhow::Result<Option<AppProxyRoute>> {
        let pace = || {
            let wait = limiter.lock().expect("limiter").take(Instant::now());
            tokio::time::sleep(wait)
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let name = self.action.name();
        let (generation, previous) = match (&self.action, &self.desired) {
            (Action::Delete(_), _) => {
                pace().await;
                return match within(limit, api.delete(name, &DeleteParams::default())).await? {
                    Ok(_) => Ok(None),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                    Err(e) => Err(e.into()),
                };
            }
            (_, None) => anyhow::bail!("no desired state for {name}"),
            (Action::Create(_) | Action::ApplySpec(_), Some(d)) => {
                pace().await;
                let route_id = route_id_of(name)
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                let body = serde_json::json!({
                    "apiVersion": AppProxyRoute::api_version(&()),
                    "kind": AppProxyRoute::kind(&()),
                    "metadata": {
                        "name": name,
                        "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE, ROUTE_ID_LABEL: route_id},
                    },
                    "spec": d.spec,
                });
                let mut cr =
                    within(limit, api.patch(name, &params, &Patch::Apply(&body))).await??;
                // Apply cannot take away fields another manager (kubectl edit)
                // added: remove every one the route does not have.
                if cr.spec != d.spec {
                    let extra = plan::extra_fields(
                        &serde_json::to_value(&cr.spec)?,
                        &serde_json::to_value(&d.spec)?,
                    );
                    if let Some(extra) = extra {
                        let owner = PatchParams {
                            field_manager: Some(FIELD_MANAGER.to_owned()),
                            ..PatchParams::default()
                        };
                        let patch = serde_json::json!({ "spec": extra });
                        cr =
                            within(limit, api.patch(name, &owner, &Patch::Merge(&patch))).await??;
                    }
                    if cr.spec != d.spec {
                        anyhow::bail!(
                            "the spec of {name} still differs from its route after writing it"
                        );
                    }
                }
                (cr.metadata.generation, cr.status)
            }
            (Action::ApplyStatus(_), Some(_)) => {
                let o = self.observed.as_ref();
                (
                    o.and_then(|o| o.generation),
                    o.and_then(|o| o.status.clone()),
                )
            }
        };
        let d = self.desired.as_ref().expect("checked above");
        let status: AppProxyRouteStatus =
            plan::stamp(d.status.clone(), previous.as_ref(), generation, Utc::now());
        let body = serde_json::json!({
            "apiVersion": AppProxyRoute::api_version(&()),
            "kind": AppProxyRoute::kind(&()),
            "metadata": {"name": name},
            "status": status,
        });
        pace().await;
        Ok(Some(
            within(limit, api.patch_status(name, &params, &Patch::Apply(&body))).await??,
        ))
    }
}

/// What a write does, for its span.
fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Create(_) => "create",
        Action::ApplySpec(_) => "apply_spec",
        Action::ApplyStatus(_) => "apply_status",
        Action::Delete(_) => "delete",
    }
}

/// `call`, unless it takes longer than `limit`.
async fn within<T>(limit: Duration, call: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the API server within {limit:?}"))
}
