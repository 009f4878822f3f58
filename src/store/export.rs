//! What `export-backendai` (`crate::takeover::export`) writes back into a
//! Backend.AI coordinator's database: every worker, every route and the conf
//! tokens still in use, read in one snapshot.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::backendai::{ConfTokenRow, ttl_of};
use super::rows::{self, route_columns, worker_select};
use super::sql::Tx;
use super::{ConfToken, Result, Store, db_time};
use crate::domain::{Route, Worker};

/// This database's state, as of one revision.
#[derive(Clone, Debug, Default)]
pub struct ExportState {
    pub workers: Vec<Worker>,
    /// Every route (native ones too), in creation order.
    pub routes: Vec<Route>,
    /// The conf tokens issued less than their TTL ago.
    pub tokens: Vec<ConfToken>,
}

impl Store {
    /// Every worker and route, and the conf tokens issued less than
    /// `conf_token_ttl` before `now`, from one snapshot.
    pub async fn export_state(
        &self,
        now: DateTime<Utc>,
        conf_token_ttl: Duration,
    ) -> Result<ExportState> {
        let mut tx = Tx::snapshot(&self.db).await?;
        let mut conn = tx.conn();
        let workers =
            rows::workers(&mut conn, concat!(worker_select!(), " ORDER BY w.id"), &[]).await?;
        let stored = rows::routes(
            &mut conn,
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes ORDER BY created_at, id"
            ),
            &[],
        )
        .await?;
        let tokens: Vec<ConfTokenRow> = conn
            .fetch_all(
                "SELECT id, login_session_token, kernel_host, kernel_port, session_id, user_uuid, \
                 group_id, access_key, domain_name, created_at FROM backendai_conf_tokens \
                 WHERE created_at >= $1 ORDER BY id",
                &[db_time(now - ttl_of(conf_token_ttl)).into()],
            )
            .await?;
        tx.rollback().await?;
        let by_id: HashMap<Uuid, &Worker> = workers.iter().map(|w| (w.id, w)).collect();
        let routes = stored
            .into_iter()
            .map(|r| {
                let worker = r.worker_id.and_then(|w| by_id.get(&w).copied());
                r.into_route(worker)
            })
            .collect();
        Ok(ExportState {
            workers,
            routes,
            tokens: tokens.into_iter().map(ConfToken::from).collect(),
        })
    }
}
