//! The limits and patterns that input is held to, in one place: `validate`
//! checks them, and the schemas of the request types in `route` and `worker`
//! state them, so the API document says what the validator does.
//!
//! Lengths count characters (Unicode scalar values), as JSON Schema's
//! `minLength`/`maxLength` do. Patterns are written in the subset of regular
//! expression syntax that ECMA-262 (JSON Schema), Python and Rust's `regex`
//! agree on: no look-around, no back-references.

/// Targets of one route.
pub const MAX_TARGETS: usize = 256;
/// Entries of `labels` or `envs`.
pub const MAX_MAP_ENTRIES: usize = 64;
/// A service name.
pub const MAX_NAME_LEN: usize = 63;
/// A worker name.
pub const MAX_WORKER_NAME_LEN: usize = 253;
/// A key of `labels` or `envs`.
pub const MAX_LABEL_KEY_LEN: usize = 253;
/// A value of `labels` or `envs`.
pub const MAX_LABEL_VALUE_LEN: usize = 1024;
/// A target's weight.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// A DNS name, its optional trailing dot included.
pub const MAX_DNS_NAME_LEN: usize = 253;
/// A health check's interval and timeout, in seconds.
pub const MAX_HEALTH_CHECK_SECONDS: u32 = 3600;
/// The HTTP statuses a health check may expect.
pub const MIN_HTTP_STATUS: u16 = 100;
pub const MAX_HTTP_STATUS: u16 = 599;

/// One RFC 1123 label: 1–63 letters, digits and inner hyphens.
macro_rules! dns_label {
    () => {
        "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    };
}

/// A DNS name of RFC 1123 labels with an optional trailing dot (its length
/// is bounded separately).
macro_rules! dns_name {
    () => {
        concat!(dns_label!(), r"(?:\.", dns_label!(), r")*\.?")
    };
}

/// An IPv6 address as RFC 3986 writes it (no zone), which is what Rust's
/// `Ipv6Addr` parses, with `$octet` for the octets of an embedded IPv4
/// address.
macro_rules! ipv6 {
    ($octet:expr) => {
        concat!(
            "(?:",
            "(?:[0-9A-Fa-f]{1,4}:){6}",
            ls32!($octet),
            "|::(?:[0-9A-Fa-f]{1,4}:){5}",
            ls32!($octet),
            "|(?:[0-9A-Fa-f]{1,4})?::(?:[0-9A-Fa-f]{1,4}:){4}",
            ls32!($octet),
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,1}[0-9A-Fa-f]{1,4})?::(?:[0-9A-Fa-f]{1,4}:){3}",
            ls32!($octet),
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,2}[0-9A-Fa-f]{1,4})?::(?:[0-9A-Fa-f]{1,4}:){2}",
            ls32!($octet),
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,3}[0-9A-Fa-f]{1,4})?::[0-9A-Fa-f]{1,4}:",
            ls32!($octet),
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,4}[0-9A-Fa-f]{1,4})?::",
            ls32!($octet),
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4})?::[0-9A-Fa-f]{1,4}",
            "|(?:(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4})?::",
            ")"
        )
    };
}

/// The last 32 bits of an IPv6 address: two groups or a dotted IPv4 address.
macro_rules! ls32 {
    ($octet:expr) => {
        concat!("(?:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}|", ipv4!($octet), ")")
    };
}

/// A dotted IPv4 address.
macro_rules! ipv4 {
    ($octet:expr) => {
        concat!($octet, r"\.", $octet, r"\.", $octet, r"\.", $octet)
    };
}

/// An octet as Rust's `Ipv4Addr` reads it: no leading zeros.
macro_rules! dec_octet {
    () => {
        "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    };
}

/// An octet as `ipnet` reads it in a network: up to three digits.
macro_rules! net_octet {
    () => {
        "(?:25[0-5]|2[0-4][0-9]|[01][0-9]{2}|[0-9]{1,2})"
    };
}

/// Service names and worker names: letters, digits, '-', '_' and '.'.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9._-]+$";

/// Keys of `envs`: what a POSIX shell takes as a variable name.
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// A DNS name (a wildcard worker's domain).
pub const DNS_NAME_PATTERN: &str = concat!("^", dns_name!(), "$");

/// A target's or a port worker's host: a DNS name (which covers dotted IPv4
/// addresses) or an IPv6 address, bare or in brackets.
pub const HOST_PATTERN: &str = concat!(
    "^(?:",
    dns_name!(),
    "|",
    ipv6!(dec_octet!()),
    r"|\[",
    ipv6!(dec_octet!()),
    r"\])$"
);

/// A worker's API URL: `http://` or `https://`, optional user info, then a
/// DNS name (with an optional `:port`) or a bracketed IPv6 address, then an
/// optional path, query or fragment.
pub const HTTP_URL_PATTERN: &str = concat!(
    "^https?://(?:[^/?#]*@)?(?:",
    dns_name!(),
    "(?::[^/?#@]*)?|",
    r"\[",
    ipv6!(dec_octet!()),
    r"\][^/?#@]*)(?:[/?#][\s\S]*)?$"
);

/// An allowed client network: an IPv4 or IPv6 address, or a network with
/// its prefix length. The two read differently: a bare address as Rust's
/// `IpAddr` does, a network as `ipnet` does (which takes leading zeros).
pub const CIDR_PATTERN: &str = concat!(
    "^(?:",
    ipv4!(dec_octet!()),
    "|",
    ipv6!(dec_octet!()),
    "|",
    ipv4!(net_octet!()),
    "/(?:3[0-2]|[0-2]?[0-9])|",
    ipv6!(net_octet!()),
    "/(?:12[0-8]|1[01][0-9]|0[0-9]{2}|[0-9]{1,2}))$"
);

/// A requested subdomain: free text with at least one ASCII letter or digit;
/// it is normalised into one DNS label.
pub const SUBDOMAIN_REQUEST_PATTERN: &str = "[A-Za-z0-9]";

/// A health check path: absolute.
pub const HEALTH_CHECK_PATH_PATTERN: &str = "^/";

/// The patterns against the validator: random strings over the characters
/// that matter, and the edge cases, must be accepted by both or by neither.
#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rand::Rng;
    use rand::seq::IndexedRandom;
    use regex::Regex;

    use super::*;
    use crate::domain::validate;
    use crate::domain::{RouteSpec, WorkerRegistration};

    fn matches(pattern: &str, max_len: usize) -> impl Fn(&str) -> bool {
        let re = Regex::new(pattern).unwrap();
        move |s| s.chars().count() <= max_len && re.is_match(s)
    }

    /// Random strings of up to `len` characters from `alphabet`, then `edges`.
    fn samples(alphabet: &str, len: usize, edges: &[&str]) -> Vec<String> {
        let chars: Vec<char> = alphabet.chars().collect();
        let mut rng = rand::rng();
        let mut out: Vec<String> = (0..40_000)
            .map(|_| {
                let n = rng.random_range(0..=len);
                (0..n).map(|_| *chars.choose(&mut rng).unwrap()).collect()
            })
            .collect();
        out.extend(edges.iter().map(|e| e.to_string()));
        out
    }

    fn agree(
        what: &str,
        samples: &[String],
        schema: impl Fn(&str) -> bool,
        server: impl Fn(&str) -> bool,
    ) {
        for s in samples {
            assert_eq!(schema(s), server(s), "{what}: {s:?} (schema, server)");
        }
    }

    fn spec(f: impl FnOnce(&mut serde_json::Value)) -> Option<RouteSpec> {
        let mut v = serde_json::json!({
            "session_id": "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11",
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}]
        });
        f(&mut v);
        serde_json::from_value(v).ok()
    }

    const IP_EDGES: &[&str] = &[
        "",
        "::",
        "::1",
        "[::1]",
        "1::",
        "1:2:3:4:5:6:7:8",
        "1:2:3:4:5:6:7:8:9",
        "1::2::3",
        "::ffff:1.2.3.4",
        "1::1.2.3.4",
        "1:2:3:4:5:6:1.2.3.4",
        "1:2:3:4:5:6:7:1.2.3.4",
        "01.2.3.4",
        "1.2.3.4",
        "255.255.255.255",
        "256.1.1.1",
        "fe80::1%eth0",
        "[::1",
        "12345::",
        "a.b",
        "a-.b",
        "-a",
        "a..b",
        "a.",
        ".",
        "a_b",
    ];

    #[test]
    fn hosts() {
        let long = format!("{}.{}", "a".repeat(63), ["b"; 95].join("."));
        let edges: Vec<&str> = IP_EDGES
            .iter()
            .copied()
            .chain([long.as_str(), &long[..253], &long[..252]])
            .collect();
        let samples = samples("0123456789abcdefABx:.[]-", 14, &edges);
        agree(
            "host",
            &samples,
            matches(HOST_PATTERN, MAX_DNS_NAME_LEN),
            validate::is_host,
        );
        agree(
            "DNS name",
            &samples,
            matches(DNS_NAME_PATTERN, MAX_DNS_NAME_LEN),
            validate::is_dns_name,
        );
    }

    #[test]
    fn cidrs() {
        let samples = samples(
            "0123456789abf:./",
            14,
            &[
                "10.0.0.0/8",
                "10.0.0.0/33",
                "10.0.0.0/08",
                "::/0",
                "::/128",
                "::/129",
                "1.2.3.4/",
                "/8",
                "1.2.3.4/32",
                "::1/01",
            ],
        );
        let server = |s: &str| {
            spec(|v| v["access"] = serde_json::json!({"allowed_client_ips": [s]})).is_some()
        };
        agree("CIDR", &samples, matches(CIDR_PATTERN, usize::MAX), server);
    }

    #[test]
    fn names_env_keys_and_subdomains() {
        let samples = samples("azAZ09._-/ é", 8, &["", &"a".repeat(63), &"a".repeat(64)]);
        let valid = |spec: Option<RouteSpec>| {
            spec.is_some_and(|s| validate::route_spec(&s, Utc::now()).is_ok())
        };
        agree(
            "service",
            &samples,
            matches(NAME_PATTERN, MAX_NAME_LEN),
            |s| valid(spec(|v| v["service"] = s.into())),
        );
        agree(
            "env key",
            &samples,
            matches(ENV_NAME_PATTERN, MAX_LABEL_KEY_LEN),
            |s| valid(spec(|v| v["envs"] = serde_json::json!({ s: "x" }))),
        );
        let subdomains = self::samples("aZ0-_.! é⒈日", 6, &["", "a\u{2488}b", "!!!", "日本"]);
        agree(
            "subdomain",
            &subdomains,
            matches(SUBDOMAIN_REQUEST_PATTERN, usize::MAX),
            |s| {
                valid(spec(|v| {
                    v["frontend"] = serde_json::json!({ "subdomain": s })
                }))
            },
        );
    }

    #[test]
    fn worker_names_and_api_urls() {
        let registration = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::json!({
                "name": "w", "api_url": "http://w",
                "frontend": {"mode": "port", "host": "h", "port_range": [1, 2]}
            });
            f(&mut v);
            serde_json::from_value::<WorkerRegistration>(v)
                .is_ok_and(|r| validate::registration(&r).is_ok())
        };
        let names = samples("aZ0._-/ é", 6, &["", &"a".repeat(253), &"a".repeat(254)]);
        agree(
            "worker name",
            &names,
            matches(NAME_PATTERN, MAX_WORKER_NAME_LEN),
            |s| registration(&|v| v["name"] = s.into()),
        );
        let tails = samples("a0.-:@/?#[]é", 8, &[]);
        let mut urls: Vec<String> = Vec::new();
        for (i, tail) in tails.iter().enumerate() {
            let scheme = ["http://", "https://", "ftp://", "http:/", ""][i % 5];
            urls.push(format!("{scheme}{tail}"));
        }
        urls.extend(
            [
                "http://[::1]:8080/x",
                "http://[::1",
                "http://u@[::1]",
                "http://a@b@c",
                "http://x@y:z@-bad",
                "http://h:abc",
                "http://h:1/\n",
                "http://1::",
                "https://10.0.0.5:10201",
            ]
            .map(String::from),
        );
        agree(
            "api_url",
            &urls,
            matches(HTTP_URL_PATTERN, usize::MAX),
            |s| registration(&|v| v["api_url"] = s.into()),
        );
    }
}
