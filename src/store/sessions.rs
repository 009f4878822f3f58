//! A session's circuits, removed when the Backend.AI Manager says the
//! session ended (`crate::backendai::sessions`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{self, route_columns};
use super::{Result, Store, db_time};
use crate::domain::AppMode;

impl Store {
    /// Deletes the interactive Backend.AI circuits of session `session_id`
    /// ([`crate::domain::RouteSpec::is_circuit_of_session`]: whatever their
    /// protocol; not native routes of the same session id) in one
    /// transaction, each a `delete` in the change log; answers their ids
    /// (none when the session has none left, so a repeat changes nothing).
    pub async fn delete_session_circuits(
        &self,
        session_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Vec<Uuid>> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let routes = rows::routes(
            &mut tx.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE app_mode = $1 AND session_id = $2 ORDER BY id"
            ),
            &[AppMode::Interactive.as_str().into(), session_id.into()],
        )
        .await?;
        let circuits: Vec<_> = routes
            .into_iter()
            .filter(|r| r.spec.is_circuit_of_session(session_id))
            .collect();
        if circuits.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        for route in &circuits {
            tx.conn()
                .execute("DELETE FROM routes WHERE id = $1", &[route.id.into()])
                .await?;
            tx.log_route_deleted(route.id, route.worker_id, now);
        }
        tx.commit().await?;
        Ok(circuits.into_iter().map(|r| r.id).collect())
    }
}
