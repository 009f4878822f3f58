//! What Backend.AI's Manager API needs beyond the route operations: its conf
//! tokens (`POST /v2/conf`), routes found by their Backend.AI keys, spec
//! edits that read and write in one transaction (route lists registered
//! concurrently must not lose each other).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{self, route_columns};
use super::sql;
use super::{Result, Store, StoreError, db_time};
use crate::domain::{Route, RouteSpec, Worker, validate};

/// What `POST /v2/conf` stored: where a session's app listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfToken {
    pub id: Uuid,
    pub login_session_token: Option<String>,
    pub kernel_host: String,
    pub kernel_port: u16,
    pub session_id: Uuid,
    pub user_uuid: Uuid,
    pub group_id: Uuid,
    pub access_key: String,
    pub domain_name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct ConfTokenRow {
    id: Uuid,
    login_session_token: Option<String>,
    kernel_host: String,
    kernel_port: i32,
    session_id: Uuid,
    user_uuid: Uuid,
    group_id: Uuid,
    access_key: String,
    domain_name: String,
    created_at: DateTime<Utc>,
}

impl From<ConfTokenRow> for ConfToken {
    fn from(r: ConfTokenRow) -> ConfToken {
        ConfToken {
            id: r.id,
            login_session_token: r.login_session_token,
            kernel_host: r.kernel_host,
            // The column's CHECK keeps it in range.
            kernel_port: u16::try_from(r.kernel_port).unwrap_or_default(),
            session_id: r.session_id,
            user_uuid: r.user_uuid,
            group_id: r.group_id,
            access_key: r.access_key,
            domain_name: r.domain_name,
            created_at: r.created_at,
        }
    }
}

/// A TTL as a calendar duration (saturating: a huge TTL never expires).
pub(super) fn ttl_of(ttl: Duration) -> chrono::Duration {
    let century = chrono::Duration::days(36_500);
    chrono::Duration::from_std(ttl).map_or(century, |t| t.min(century))
}

impl Store {
    /// Stores a conf token (its `created_at` at the database's precision),
    /// and deletes the tokens older than `ttl` in the same transaction, so
    /// the table holds at most what `ttl` worth of `POST /v2/conf` adds.
    pub async fn insert_conf_token(&self, token: &ConfToken, ttl: Duration) -> Result<()> {
        let mut tx = sql::Tx::write(&self.db).await?;
        tx.conn()
            .execute(
                "DELETE FROM backendai_conf_tokens WHERE created_at < $1",
                &[db_time(token.created_at - ttl_of(ttl)).into()],
            )
            .await?;
        tx.conn()
            .execute(
                "INSERT INTO backendai_conf_tokens (id, login_session_token, kernel_host, kernel_port, \
                 session_id, user_uuid, group_id, access_key, domain_name, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    token.id.into(),
                    token.login_session_token.as_deref().into(),
                    token.kernel_host.as_str().into(),
                    token.kernel_port.into(),
                    token.session_id.into(),
                    token.user_uuid.into(),
                    token.group_id.into(),
                    token.access_key.as_str().into(),
                    token.domain_name.as_str().into(),
                    db_time(token.created_at).into(),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Conf token `id`, if it exists and was issued less than `ttl` before
    /// `now` (an expired token is absent, whether or not it was deleted yet).
    pub async fn conf_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Option<ConfToken>> {
        let mut c = sql::acquire(&self.db).await?;
        let row: Option<ConfTokenRow> = c
            .conn()
            .fetch_optional(
                "SELECT id, login_session_token, kernel_host, kernel_port, session_id, user_uuid, \
                 group_id, access_key, domain_name, created_at FROM backendai_conf_tokens \
                 WHERE id = $1 AND created_at >= $2",
                &[id.into(), db_time(now - ttl_of(ttl)).into()],
            )
            .await?;
        Ok(row.map(ConfToken::from))
    }

    /// The inference route of endpoint `endpoint_id`, with its worker.
    pub async fn route_by_endpoint(
        &self,
        endpoint_id: Uuid,
    ) -> Result<Option<(Route, Option<Worker>)>> {
        let mut c = sql::acquire(&self.db).await?;
        let Some(stored) = rows::route(
            &mut c.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE app_mode = 'inference' AND endpoint_id = $1"
            ),
            &[endpoint_id.into()],
        )
        .await?
        else {
            return Ok(None);
        };
        let worker = rows::worker_of(&mut c.conn(), &stored).await?;
        Ok(Some((stored.into_route(worker.as_ref()), worker)))
    }

    /// The interactive route of `service` in session `session_id`, with its worker.
    pub async fn session_route(
        &self,
        session_id: Uuid,
        service: &str,
    ) -> Result<Option<(Route, Option<Worker>)>> {
        let mut c = sql::acquire(&self.db).await?;
        let Some(stored) = rows::route(
            &mut c.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE app_mode = 'interactive' AND session_id = $1 AND service = $2"
            ),
            &[session_id.into(), service.into()],
        )
        .await?
        else {
            return Ok(None);
        };
        let worker = rows::worker_of(&mut c.conn(), &stored).await?;
        Ok(Some((stored.into_route(worker.as_ref()), worker)))
    }

    /// Edits route `id`'s spec in one write transaction: `edit` sees the
    /// current spec and changes it (or answers an error, which is passed
    /// on). The edited spec is validated; an edit that changes nothing
    /// writes nothing. Identity, protocol, pin and frontend may not change.
    pub async fn edit_route<E: From<StoreError>>(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        edit: impl FnOnce(&mut RouteSpec) -> std::result::Result<(), E>,
    ) -> std::result::Result<Route, E> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let mut current = rows::route_by_id(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let worker = rows::worker_of(&mut tx.conn(), &current).await?;
        let mut spec = current.spec.clone();
        edit(&mut spec)?;
        if !spec.same_identity(&current.spec)
            || spec.worker_id != current.spec.worker_id
            || spec.frontend != current.spec.frontend
        {
            return Err(StoreError::Conflict {
                message: format!("route {id}: an edit may not change its identity or placement"),
                existing: None,
            }
            .into());
        }
        if current.spec.mutable_fields_equal(&spec) {
            return Ok(current.into_route(worker.as_ref()));
        }
        // An expiry already in the past may stay; a new one must be ahead.
        let check_now = if spec.expires_at == current.spec.expires_at {
            DateTime::<Utc>::MIN_UTC
        } else {
            now
        };
        validate::route_spec(&spec, check_now).map_err(StoreError::from)?;
        current.spec = spec;
        let route = self
            .write_spec(&mut tx, current, worker.as_ref(), now)
            .await?;
        tx.commit().await?;
        Ok(route)
    }
}
