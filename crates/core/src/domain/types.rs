//! Leaf types that routes and workers share: app modes, protocols, a worker's
//! frontend and its status. Depends on nothing else in the domain but the
//! leaf `schemas` (which states its fields' limits), so `route` and `worker`
//! both use it without using each other.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether a route belongs to one interactive session or to an inference endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppMode {
    #[default]
    Interactive,
    Inference,
}

impl AppMode {
    pub const ALL: [AppMode; 2] = [AppMode::Interactive, AppMode::Inference];

    pub fn as_str(self) -> &'static str {
        match self {
            AppMode::Interactive => "interactive",
            AppMode::Inference => "inference",
        }
    }
}

/// The protocol a worker speaks to users on the route's frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
    Grpc,
    H2,
    Preopen,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Http,
        Protocol::Tcp,
        Protocol::Grpc,
        Protocol::H2,
        Protocol::Preopen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Grpc => "grpc",
            Protocol::H2 => "h2",
            Protocol::Preopen => "preopen",
        }
    }

    /// Subdomain (wildcard) frontends route on the HTTP `Host` header or TLS SNI,
    /// which a raw TCP stream does not carry.
    pub fn routable_by_host(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

macro_rules! impl_str_enum {
    ($ty:ty, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown {} {s:?}", $what))
            }
        }
    };
}
impl_str_enum!(AppMode, "app mode");
impl_str_enum!(Protocol, "protocol");

/// How a worker exposes routes to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum WorkerFrontend {
    /// One port per route, from an inclusive range, on `host`.
    Port {
        #[schemars(schema_with = "super::schemas::host")]
        host: String,
        /// `[low, high]`, with low at most high.
        #[schemars(inner(range(min = 1)))]
        port_range: [u16; 2],
    },
    /// One subdomain per route under `domain`, all on `port`.
    Wildcard {
        #[schemars(schema_with = "super::schemas::dns_name")]
        domain: String,
        #[serde(default = "default_wildcard_port")]
        #[schemars(range(min = 1))]
        port: u16,
        #[serde(default)]
        tls: bool,
    },
}

fn default_wildcard_port() -> u16 {
    443
}

impl WorkerFrontend {
    /// How many routes the frontend can hold at most.
    pub fn slots(&self) -> u64 {
        match self {
            WorkerFrontend::Port { port_range, .. } => {
                u64::from(port_range[1].saturating_sub(port_range[0])) + 1
            }
            WorkerFrontend::Wildcard { .. } => u64::MAX,
        }
    }
}

/// Health of a worker as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WorkerStatus {
    /// Heartbeating; takes new routes.
    Ready,
    /// Alive but takes no new routes (e.g. its pod is not ready); keeps its own.
    NotReady,
    /// Missed its heartbeats or its pod is gone; its routes move elsewhere.
    Lost,
    /// Being removed; its routes are moving away.
    Draining,
}

impl WorkerStatus {
    pub const ALL: [WorkerStatus; 4] = [
        WorkerStatus::Ready,
        WorkerStatus::NotReady,
        WorkerStatus::Lost,
        WorkerStatus::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Ready => "Ready",
            WorkerStatus::NotReady => "NotReady",
            WorkerStatus::Lost => "Lost",
            WorkerStatus::Draining => "Draining",
        }
    }

    pub fn parse(s: &str) -> Option<WorkerStatus> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}
