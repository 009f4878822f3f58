//! Taking over a Backend.AI App Proxy coordinator's state
//! (`appproxy-coordinator import-backendai --from <its PostgreSQL URL>`),
//! and handing it back ([`export`]: `export-backendai --to <URL>`):
//! [`read`] reads upstream 26.9.x's rows (refusing an alembic revision it does
//! not know), [`map`] turns them into ours, and [`crate::store::Store::import`]
//! writes them in one transaction, with their ids, ports and subdomains, so
//! every URL the Manager and the users hold stays the same.
//!
//! What it prints goes to `out` (stdout): every row it refuses or that
//! collides with this database, then the counts per kind. The source URL is
//! printed without its password. Progress goes to stderr when that is a
//! terminal.

pub mod export;
pub mod map;
pub mod read;

use std::io::{IsTerminal, Write};

use anyhow::bail;
use chrono::{DateTime, Utc};

use crate::backendai::circuit::Circuit;
use crate::secret::redacted_url;
use crate::store::{Import, ImportMode, ImportReport, Store};

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub report: ImportReport,
    /// Rows upstream holds that cannot be ours (and why).
    pub refused: Vec<map::Refused>,
}

fn progress(message: &str) {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = writeln!(err, "{message}");
    }
}

/// `url` without its password (nor any query string, which may hold one).
fn shown(url: &str) -> String {
    redacted_url(url.split('?').next().unwrap_or_default())
}

/// Imports upstream's state at `from` into `store` (see the module
/// documentation). Fails, writing nothing, on an unknown schema revision, on
/// a database holding routes of its own without `mode.merge`, or on any
/// database error.
pub async fn import_backendai(
    store: &Store,
    from: &str,
    mode: ImportMode,
    now: DateTime<Utc>,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    progress(&format!("reading {}", shown(from)));
    let pool = read::connect(from).await?;
    let upstream = read::read(&pool).await;
    pool.close().await;
    let upstream = upstream?;
    writeln!(
        out,
        "upstream {} at alembic revision {}: {} workers, {} circuits, {} endpoints, {} tokens",
        shown(from),
        upstream.revision,
        upstream.workers.len(),
        upstream.circuits.len(),
        upstream.endpoints.len(),
        upstream.tokens.len()
    )?;
    let mapped = map::map(&upstream, now);
    for r in &mapped.refused {
        writeln!(out, "refused {} {}: {}", r.kind, r.id, r.reason)?;
    }
    let import = Import {
        workers: mapped.workers,
        routes: mapped.routes,
        tokens: mapped.tokens,
    };
    progress(&format!(
        "checking {} workers, {} circuits, {} tokens against {}",
        import.workers.len(),
        import.routes.len(),
        import.tokens.len(),
        store.backend()
    ));
    let report = store
        .import(&import, mode, now, |route, worker| {
            serde_json::to_value(Circuit::of(route, worker)).ok()
        })
        .await?;
    for c in &report.conflicts {
        writeln!(out, "conflict {} {}: {}", c.kind, c.id, c.reason)?;
    }
    let count = |(new, here): (usize, usize), conflict: &str, refused: &str| {
        let conflicts = report
            .conflicts
            .iter()
            .filter(|c| c.kind == conflict)
            .count();
        let refused = mapped.refused.iter().filter(|r| r.kind == refused).count();
        format!("{new} new, {here} already here, {conflicts} in conflict, {refused} refused")
    };
    let workers = count(report.workers, "worker", "worker");
    writeln!(out, "workers: {workers}")?;
    writeln!(
        out,
        "circuits: {}",
        count(report.routes, "route", "circuit")
    )?;
    writeln!(
        out,
        "endpoints: {} with their circuit's health check, {} without a circuit (nothing to serve)",
        mapped.endpoints, mapped.endpoints_without_circuit
    )?;
    writeln!(out, "tokens: {}", count(report.tokens, "token", "token"))?;
    if report.own_routes > 0 && !mode.merge {
        bail!(
            "this database holds {} routes that are not upstream's: refusing to import next to \
             them without --merge (nothing written)",
            report.own_routes
        );
    }
    if mode.dry_run {
        writeln!(out, "dry run: nothing written")?;
    } else if report.written {
        writeln!(
            out,
            "imported in one transaction, up to revision {}",
            report.revision.unwrap_or_default()
        )?;
    } else {
        writeln!(
            out,
            "nothing to import: every row is already here (nothing written)"
        )?;
    }
    Ok(Outcome {
        report,
        refused: mapped.refused,
    })
}
