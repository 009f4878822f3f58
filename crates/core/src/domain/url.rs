//! The one rule for the URL of a frontend (and of a worker's API): every URL
//! the coordinator hands out — a route's `frontend.url`, a Backend.AI
//! endpoint's URL, the endpoint token's `app_url`, the `/setup` address of
//! an interactive app — and failover's "the URL stays the same" are made
//! here.
//!
//! The URL is written as Backend.AI's Manager receives it from upstream
//! (pydantic's `AnyUrl`): the host in lower case, an IPv6 literal in
//! brackets, no port when it is the scheme's default (80 for http, 443 for
//! https). A trailing dot of a domain is kept: it is a different name to a
//! client, and so a different URL.

use super::types::{Protocol, WorkerFrontend};

/// What a route's URL on a worker is made of besides the route's own port
/// or subdomain: the scheme and, in port mode, the host; in wildcard mode
/// the domain and its traffic port. Two workers with the same home give a
/// route (the same port or subdomain) the same URL, and only then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlHome {
    pub scheme: &'static str,
    pub place: Place,
}

/// Where, in a [`UrlHome`], a route's seat (its port or subdomain) goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Port mode: `<scheme>://<host>:<port>`.
    Host(String),
    /// Wildcard mode: `<scheme>://<subdomain>.<domain>[:<port>]`.
    Domain { domain: String, port: u16 },
}

impl UrlHome {
    /// The home of routes of `protocol` on a worker with `frontend`.
    /// `backendai_tls` is a Backend.AI worker's TLS (it listens or is
    /// advertised with TLS): its circuits are http or https whatever their
    /// protocol, as upstream writes them. A native worker's tcp routes are
    /// `tcp://`, the others https on a TLS wildcard frontend, else http.
    pub fn new(
        frontend: &WorkerFrontend,
        backendai_tls: Option<bool>,
        protocol: Protocol,
    ) -> UrlHome {
        let tls_frontend = matches!(frontend, WorkerFrontend::Wildcard { tls: true, .. });
        let scheme = match (backendai_tls, protocol) {
            (Some(true), _) => "https",
            (Some(false), _) => "http",
            (None, Protocol::Tcp) => "tcp",
            (None, _) if tls_frontend => "https",
            (None, _) => "http",
        };
        let place = match frontend {
            WorkerFrontend::Port { host, .. } => Place::Host(normal_host(host)),
            WorkerFrontend::Wildcard { domain, port, .. } => Place::Domain {
                domain: normal_host(domain),
                port: *port,
            },
        };
        UrlHome { scheme, place }
    }

    /// The URL of the route at `port` (port mode) or `subdomain` (wildcard
    /// mode) here; `None` without one.
    pub fn url(&self, port: Option<u16>, subdomain: Option<&str>) -> Option<String> {
        match &self.place {
            Place::Host(host) => Some(origin(self.scheme, host, port?)),
            Place::Domain { domain, port } => {
                let host = format!("{}.{domain}", subdomain?);
                Some(origin(self.scheme, &host, *port))
            }
        }
    }
}

/// `<scheme>://<host>[:<port>]`: the host normalised, the port left out when
/// it is the scheme's default.
pub fn origin(scheme: &str, host: &str, port: u16) -> String {
    let host = normal_host(host);
    let default = matches!((scheme, port), ("http", 80) | ("https", 443));
    if default {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

/// A host as a URL carries it: lower case; an IPv6 literal in brackets.
fn normal_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(host: &str) -> WorkerFrontend {
        WorkerFrontend::Port {
            host: host.into(),
            port_range: [1, 65535],
        }
    }

    fn wild(domain: &str, port: u16, tls: bool) -> WorkerFrontend {
        WorkerFrontend::Wildcard {
            domain: domain.into(),
            port,
            tls,
        }
    }

    #[test]
    fn native_urls_follow_the_protocol_and_the_frontend() {
        let http = UrlHome::new(&port("Proxy.Example.com"), None, Protocol::Http);
        assert_eq!(
            http.url(Some(10210), None).as_deref(),
            Some("http://proxy.example.com:10210")
        );
        assert_eq!(
            http.url(Some(80), None).as_deref(),
            Some("http://proxy.example.com")
        );
        let tcp = UrlHome::new(&port("proxy.example.com"), None, Protocol::Tcp);
        assert_eq!(
            tcp.url(Some(80), None).as_deref(),
            Some("tcp://proxy.example.com:80")
        );
        let tls = UrlHome::new(&wild("apps.example.com", 443, true), None, Protocol::Http);
        assert_eq!(
            tls.url(None, Some("jupyter-3f6c")).as_deref(),
            Some("https://jupyter-3f6c.apps.example.com")
        );
        let plain = UrlHome::new(&wild("apps.example.com", 8080, false), None, Protocol::Http);
        assert_eq!(
            plain.url(None, Some("a")).as_deref(),
            Some("http://a.apps.example.com:8080")
        );
        assert_eq!(plain.url(Some(1), None), None);
    }

    #[test]
    fn backendai_urls_follow_the_workers_tls() {
        let home = UrlHome::new(&port("::1"), Some(true), Protocol::Tcp);
        assert_eq!(
            home.url(Some(10205), None).as_deref(),
            Some("https://[::1]:10205")
        );
        let home = UrlHome::new(&wild("apps.test.", 443, false), Some(false), Protocol::Http);
        assert_eq!(
            home.url(None, Some("x")).as_deref(),
            Some("http://x.apps.test.:443")
        );
    }

    #[test]
    fn an_origin_leaves_out_only_the_schemes_default_port() {
        assert_eq!(origin("https", "W1.Example", 443), "https://w1.example");
        assert_eq!(origin("http", "w1", 443), "http://w1:443");
        assert_eq!(origin("http", "fe80::1", 10201), "http://[fe80::1]:10201");
        assert_eq!(origin("http", "[fe80::1]", 80), "http://[fe80::1]");
    }
}
