//! Why a Backend.AI use case refuses or fails, in the terms upstream answers
//! with. The HTTP side (`crate::api::backendai::error`) gives each its
//! status and upstream's error body; nothing here knows HTTP.

use crate::store::StoreError;

/// A Backend.AI use case's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the store answered, answered as any store error is.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `E00002: No such <object>.` (`circuit`, `worker`, `token`), with a
    /// detail when there is one.
    #[error("no such {object}")]
    NotFound {
        object: &'static str,
        detail: Option<String>,
    },
    /// A value upstream's validation refuses: where it is (`loc`, as
    /// upstream's `data.errors[].loc`) and why.
    #[error("{}: {msg}", loc.join("."))]
    Invalid { loc: Vec<String>, msg: String },
    /// An `existing_url` that does not parse (upstream's `InvalidURLError`).
    #[error("{0}")]
    InvalidUrl(String),
    /// Upstream's `InvalidSessionParameterError`.
    #[error("{0}")]
    InvalidSessionParameter(String),
    /// Credentials that do not fit the request (a conf token of another
    /// session).
    #[error("{0}")]
    InvalidCredentials(String),
    /// The caller may not do this (another user's app).
    #[error("{0}")]
    Forbidden(String),
    /// The frontend port asked for is taken.
    #[error("{0}")]
    PortNotAvailable(String),
    /// No worker holds or can take the circuit.
    #[error("{0}")]
    WorkerNotAvailable(String),
    /// `E10001`: the worker did not acknowledge a circuit in time.
    #[error("E10001: Proxy worker {authority} not responding")]
    WorkerNotResponding { authority: String },
    /// A worker registration without its frontend's configuration
    /// (upstream's `MissingFrontendConfigError`).
    #[error("{0}")]
    MissingFrontendConfig(String),
    /// A dependency other than the database (Redis) does not answer.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// `E00002: No such <object>.`
    pub fn not_found(object: &'static str) -> Error {
        Error::NotFound {
            object,
            detail: None,
        }
    }

    /// A value refused at `loc` (field names, outermost first).
    pub fn invalid(loc: &[&str], msg: impl Into<String>) -> Error {
        Error::Invalid {
            loc: loc.iter().map(|s| (*s).to_owned()).collect(),
            msg: msg.into(),
        }
    }

    /// A create that lost: a taken port is upstream's port-not-available,
    /// the rest as the store said it.
    pub fn creating(e: StoreError) -> Error {
        match e {
            StoreError::Conflict { message, .. } => Error::PortNotAvailable(message),
            e => Error::Store(e),
        }
    }
}
