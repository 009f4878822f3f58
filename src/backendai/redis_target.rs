//! Where a Redis is: one server (`redis://`, `rediss://`), or the primary
//! of a Redis Sentinel setup (`redis+sentinel://`, `rediss+sentinel://`),
//! asked of the sentinels on every new connection.
//!
//! **Sentinel URLs.**
//! `redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/SERVICE_NAME[/DB][?sentinel_password=P&sentinel_username=U]`:
//! the sentinels' addresses (port 26379 when none is given), the service
//! (master) name they monitor, the database, and the credentials of the
//! Redis servers (`USER`/`PASSWORD`) and of the sentinels (the query; none
//! by default, as upstream's `sentinel_password`). `rediss+sentinel://` is
//! TLS to the sentinels and to the servers, verified like `rediss://`
//! (`redis_ca_file`, `redis_client_cert`/`redis_client_key`). Upstream's
//! separate `sentinel` + `service_name` settings become such a URL
//! ([`sentinel_url`]).
//!
//! **Failover.** Nothing here keeps a connection across one: Sentinel
//! closes every client connection of the servers it reconfigures, each
//! loop that held one reconnects through [`RedisTarget::connect`] or
//! [`RedisTarget::pubsub`], which ask the sentinels for the primary again
//! and check with `ROLE` that it is one (the `redis` crate's
//! `SentinelClient`). A connection that meets a `READONLY` reply (a server
//! demoted under it) is dropped like a broken one.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};

use super::RedisTls;
use crate::secret::redacted_url;

/// The sentinels' port when a URL gives none (Redis Sentinel's default).
pub const SENTINEL_PORT: u16 = 26379;
/// The syntax, for error messages.
const SYNTAX: &str = "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE_NAME[/DB]\
                      [?sentinel_password=P&sentinel_username=U]";

/// A sentinel URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the sentinels and the servers.
    pub tls: bool,
    pub sentinels: Vec<(String, u16)>,
    pub service_name: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

/// Whether `url` names a Sentinel setup.
pub fn is_sentinel_url(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "redis+sentinel" | "rediss+sentinel" | "valkey+sentinel" | "valkeys+sentinel"
    )
}

/// Parses a sentinel URL (syntax in the module's documentation); the error
/// says what is wrong and never shows a password.
pub fn parse_sentinel_url(url: &str) -> anyhow::Result<SentinelUrl> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("not a URL; expected {SYNTAX}"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "redis+sentinel" | "valkey+sentinel" => false,
        "rediss+sentinel" | "valkeys+sentinel" => true,
        other => anyhow::bail!("scheme {other}:// is not a sentinel URL; expected {SYNTAX}"),
    };
    anyhow::ensure!(
        !rest.contains('#'),
        "a sentinel URL takes no #fragment (TLS without certificate verification is not done: \
         give the CA in redis_ca_file)"
    );
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((user, pass)) => (user, Some(pass)),
                None => (u, None),
            };
            (
                Some(percent_decode(user)?).filter(|u| !u.is_empty()),
                pass.map(percent_decode).transpose()?,
            )
        }
    };
    let sentinels = hosts
        .split(',')
        .map(host_port)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut segments = path.trim_start_matches('/').split('/');
    let service_name = percent_decode(segments.next().unwrap_or_default())?;
    anyhow::ensure!(
        !service_name.is_empty(),
        "no service name (the master name the sentinels monitor); expected {SYNTAX}"
    );
    let db = match segments.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .with_context(|| format!("database {db:?} is not a number; expected {SYNTAX}"))?,
    };
    anyhow::ensure!(
        segments.next().is_none(),
        "too many path segments; expected {SYNTAX}"
    );
    let mut parsed = SentinelUrl {
        tls,
        sentinels,
        service_name,
        db,
        username,
        password,
        sentinel_username: None,
        sentinel_password: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = Some(percent_decode(value)?).filter(|v| !v.is_empty());
        match key {
            "sentinel_password" => parsed.sentinel_password = value,
            "sentinel_username" => parsed.sentinel_username = value,
            other => anyhow::bail!(
                "unknown parameter {other:?} (a sentinel URL takes sentinel_password and \
                 sentinel_username)"
            ),
        }
    }
    Ok(parsed)
}

/// `HOST[:PORT]` or `[V6]:PORT`; the port defaults to [`SENTINEL_PORT`].
fn host_port(text: &str) -> anyhow::Result<(String, u16)> {
    let bad = || format!("sentinel address {text:?} is not HOST[:PORT]; expected {SYNTAX}");
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').with_context(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').with_context(bad)?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    anyhow::ensure!(!host.is_empty() && !host.contains(['/', '@', ' ']), bad());
    let port = match port {
        None => SENTINEL_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).with_context(bad)?,
    };
    Ok((host.to_owned(), port))
}

fn percent_decode(text: &str) -> anyhow::Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .context("a bad %-escape in the URL")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("the URL's %-escapes are not UTF-8")
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Upstream's separate settings as a sentinel URL: the `sentinels`
/// (`HOST[:PORT]` each) and `service_name`, with the credentials, database
/// and TLS (`rediss://`) of `base` (a `redis[s]://` URL whose host is not
/// used, as upstream ignores `addr` when `sentinel` is set).
pub fn sentinel_url(
    sentinels: &[String],
    service_name: &str,
    base: Option<&str>,
) -> anyhow::Result<String> {
    anyhow::ensure!(!sentinels.is_empty(), "no sentinel address");
    anyhow::ensure!(!service_name.trim().is_empty(), "the service name is empty");
    for s in sentinels {
        host_port(s.trim())?;
    }
    let (mut scheme, mut userinfo, mut db) = ("redis+sentinel", String::new(), 0);
    if let Some(base) = base {
        anyhow::ensure!(
            !is_sentinel_url(base),
            "with separate sentinel settings the URL must be redis:// or rediss:// (for the \
             password, database and TLS), not {}",
            redacted_url(base)
        );
        let info = redis::IntoConnectionInfo::into_connection_info(base)
            .map_err(|e| anyhow::anyhow!("invalid URL {}: {e}", redacted_url(base)))?;
        if let ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
            anyhow::ensure!(
                !insecure,
                "TLS without certificate verification is not done"
            );
            scheme = "rediss+sentinel";
        }
        let settings = info.redis_settings();
        db = settings.db();
        match (settings.username(), settings.password()) {
            (None, None) => {}
            (user, pass) => {
                userinfo = format!(
                    "{}{}@",
                    percent_encode(user.unwrap_or_default()),
                    pass.map(|p| format!(":{}", percent_encode(p)))
                        .unwrap_or_default()
                );
            }
        }
    }
    let hosts: Vec<&str> = sentinels.iter().map(|s| s.trim()).collect();
    Ok(format!(
        "{scheme}://{userinfo}{}/{}/{db}",
        hosts.join(","),
        percent_encode(service_name.trim())
    ))
}

/// A Redis: one server, or the primary of a Sentinel setup.
#[derive(Clone)]
pub struct RedisTarget {
    inner: Target,
}

#[derive(Clone)]
enum Target {
    Direct(Box<redis::Client>),
    Sentinel(Arc<Sentinel>),
}

/// A Sentinel setup's primary: what builds its client, and the client
/// (which keeps its connections to the sentinels between look-ups).
struct Sentinel {
    spec: SentinelSpec,
    client: tokio::sync::Mutex<SentinelClient>,
}

#[derive(Clone)]
struct SentinelSpec {
    url: SentinelUrl,
    certificates: Option<redis::TlsCertificates>,
}

impl SentinelSpec {
    fn build(&self) -> redis::RedisResult<SentinelClient> {
        let u = &self.url;
        let addrs = u.sentinels.iter().map(|(host, port)| {
            if u.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        });
        let mut b = SentinelClientBuilder::new(addrs, &u.service_name, SentinelServerType::Master)?
            .set_client_to_redis_db(u.db);
        if let Some(user) = &u.username {
            b = b.set_client_to_redis_username(user);
        }
        if let Some(password) = &u.password {
            b = b.set_client_to_redis_password(password);
        }
        if let Some(user) = &u.sentinel_username {
            b = b.set_client_to_sentinel_username(user);
        }
        if let Some(password) = &u.sentinel_password {
            b = b.set_client_to_sentinel_password(password);
        }
        if u.tls {
            b = b
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = &self.certificates {
                b = b
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs.clone());
            }
        }
        b.build()
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Target::Direct(c) => write!(
                f,
                "RedisTarget::Direct({:?})",
                c.get_connection_info().addr()
            ),
            Target::Sentinel(s) => write!(
                f,
                "RedisTarget::Sentinel({:?} {} db {})",
                s.spec.url.sentinels, s.spec.url.service_name, s.spec.url.db
            ),
        }
    }
}

fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} did not answer in time"),
    ))
}

impl RedisTarget {
    /// The Redis `url` names, with the TLS files for `rediss://` and
    /// `rediss+sentinel://`; errors name `setting` and never the password.
    /// Nothing connects yet.
    pub fn open(url: &str, tls: &RedisTls, setting: &str) -> anyhow::Result<RedisTarget> {
        if !is_sentinel_url(url) {
            let client =
                super::redis_client(url, tls).map_err(|e| anyhow::anyhow!("{setting}: {e:#}"))?;
            return Ok(RedisTarget::direct(client));
        }
        let shown = redacted_url(url);
        let parsed = parse_sentinel_url(url)
            .map_err(|e| anyhow::anyhow!("{setting}: invalid sentinel URL {shown}: {e:#}"))?;
        let certificates = if parsed.tls {
            super::tls_certificates(tls).map_err(|e| anyhow::anyhow!("{setting}: {e:#}"))?
        } else {
            anyhow::ensure!(
                !tls.is_set(),
                "{setting}: redis_ca_file, redis_client_cert and redis_client_key are for TLS, \
                 which needs a rediss+sentinel:// URL; the URL is {shown}"
            );
            None
        };
        let spec = SentinelSpec {
            url: parsed,
            certificates,
        };
        let client = spec
            .build()
            .map_err(|e| anyhow::anyhow!("{setting}: unusable sentinel URL {shown}: {e}"))?;
        Ok(RedisTarget {
            inner: Target::Sentinel(Arc::new(Sentinel {
                spec,
                client: tokio::sync::Mutex::new(client),
            })),
        })
    }

    pub fn direct(client: redis::Client) -> RedisTarget {
        RedisTarget {
            inner: Target::Direct(Box::new(client)),
        }
    }

    /// The same Redis (address or sentinels, credentials, TLS) with
    /// database `db`.
    pub fn with_db(&self, db: i64) -> RedisTarget {
        match &self.inner {
            Target::Direct(client) => {
                let info = client.get_connection_info().clone();
                let settings = info.redis_settings().clone().set_db(db);
                RedisTarget::direct(
                    redis::Client::open(info.set_redis_settings(settings))
                        .expect("a connection info always opens"),
                )
            }
            Target::Sentinel(s) => {
                let mut spec = s.spec.clone();
                spec.url.db = db;
                let client = spec
                    .build()
                    .expect("it was built once with the same settings");
                RedisTarget {
                    inner: Target::Sentinel(Arc::new(Sentinel {
                        spec,
                        client: tokio::sync::Mutex::new(client),
                    })),
                }
            }
        }
    }

    /// The one server's client, when this is not a Sentinel setup.
    pub fn direct_client(&self) -> Option<&redis::Client> {
        match &self.inner {
            Target::Direct(client) => Some(client.as_ref()),
            Target::Sentinel(_) => None,
        }
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.inner, Target::Sentinel(_))
    }

    /// A client of the server to use now: the one server, or the primary
    /// the sentinels name (checked with `ROLE`), within `timeout`.
    pub async fn client(&self, timeout: Duration) -> redis::RedisResult<redis::Client> {
        match &self.inner {
            Target::Direct(client) => Ok(client.as_ref().clone()),
            Target::Sentinel(s) => {
                let ask = async { s.client.lock().await.async_get_client().await };
                tokio::time::timeout(timeout, ask)
                    .await
                    .map_err(|_| timed_out("the sentinels"))?
            }
        }
    }

    /// A new multiplexed connection to the server to use now.
    pub async fn connect(
        &self,
        config: &redis::AsyncConnectionConfig,
        timeout: Duration,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        self.client(timeout)
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }

    /// A new pub/sub connection to the server to use now, within `timeout`.
    pub async fn pubsub(&self, timeout: Duration) -> redis::RedisResult<redis::aio::PubSub> {
        let client = self.client(timeout).await?;
        tokio::time::timeout(timeout, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("redis"))?
    }
}

/// Whether a connection that failed with `error` must be replaced (rather
/// than a command having failed on a good one): broken, timed out, or a
/// server that is no longer the primary (`READONLY`, after a failover).
pub fn must_reconnect(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_unrecoverable_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.code() == Some("READONLY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_service_the_database_and_credentials() {
        let u = parse_sentinel_url(
            "redis+sentinel://:p%40ss@10.0.0.1:26379,sentinel-b,[::1]:26380/mymaster/2\
             ?sentinel_password=s3cret",
        )
        .unwrap();
        assert_eq!(
            u,
            SentinelUrl {
                tls: false,
                sentinels: vec![
                    ("10.0.0.1".into(), 26379),
                    ("sentinel-b".into(), SENTINEL_PORT),
                    ("::1".into(), 26380)
                ],
                service_name: "mymaster".into(),
                db: 2,
                username: None,
                password: Some("p@ss".into()),
                sentinel_username: None,
                sentinel_password: Some("s3cret".into()),
            }
        );
        let tls = parse_sentinel_url("rediss+sentinel://app:pw@s1:1/svc").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.db, 0);
        assert_eq!(tls.username.as_deref(), Some("app"));
        assert!(is_sentinel_url("REDIS+SENTINEL://s/m"));
        assert!(!is_sentinel_url("redis://127.0.0.1:6379"));
    }

    #[test]
    fn a_bad_sentinel_url_says_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("redis+sentinel://:hunter2@s1:26379", "no service name"),
            ("redis+sentinel://:hunter2@s1:26379/", "no service name"),
            (
                "redis+sentinel://:hunter2@s1:notaport/m",
                "is not HOST[:PORT]",
            ),
            ("redis+sentinel://:hunter2@s1:0/m", "is not HOST[:PORT]"),
            ("redis+sentinel://:hunter2@s1,,s2/m", "is not HOST[:PORT]"),
            ("redis+sentinel://:hunter2@s1/m/x", "is not a number"),
            (
                "redis+sentinel://:hunter2@s1/m/1/2",
                "too many path segments",
            ),
            (
                "redis+sentinel://:hunter2@s1/m?password=x",
                "unknown parameter",
            ),
            ("rediss+sentinel://:hunter2@s1/m#insecure", "no #fragment"),
        ] {
            let e = RedisTarget::open(url, &RedisTls::default(), "redis_url (APPPROXY_REDIS_URL)")
                .unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains(says), "{url}: {e}");
            assert!(e.starts_with("redis_url (APPPROXY_REDIS_URL)"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e =
            RedisTarget::open("redis://:hunter2@", &RedisTls::default(), "redis_url").unwrap_err();
        assert!(!format!("{e:#}").contains("hunter2"));
    }

    #[test]
    fn separate_settings_become_a_sentinel_url_with_the_base_urls_credentials_and_tls() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            sentinel_url(&s(&["a:26379", "b:26380"]), "mymaster", None).unwrap(),
            "redis+sentinel://a:26379,b:26380/mymaster/0"
        );
        let url = sentinel_url(
            &s(&["a:26379"]),
            "my master",
            Some("rediss://user:p%40ss@ignored:6379/3"),
        )
        .unwrap();
        assert_eq!(url, "rediss+sentinel://user:p%40ss@a:26379/my%20master/3");
        let parsed = parse_sentinel_url(&url).unwrap();
        assert_eq!(parsed.password.as_deref(), Some("p@ss"));
        assert_eq!(parsed.service_name, "my master");
        assert!(sentinel_url(&s(&["a:x"]), "m", None).is_err());
        assert!(sentinel_url(&s(&["a"]), " ", None).is_err());
        assert!(sentinel_url(&s(&["a"]), "m", Some("redis+sentinel://a/m")).is_err());
    }

    #[test]
    fn another_database_keeps_the_sentinels_and_credentials() {
        let t = RedisTarget::open(
            "redis+sentinel://:pw@127.0.0.1:1/m/0",
            &RedisTls::default(),
            "redis_url",
        )
        .unwrap();
        assert!(t.is_sentinel());
        let live = t.with_db(2);
        match &live.inner {
            Target::Sentinel(s) => {
                assert_eq!(s.spec.url.db, 2);
                assert_eq!(s.spec.url.password.as_deref(), Some("pw"));
                assert_eq!(s.spec.url.sentinels, [("127.0.0.1".to_owned(), 1)]);
            }
            Target::Direct(_) => panic!("not a sentinel target"),
        }
        let direct = RedisTarget::open("redis://:pw@127.0.0.1:6379/0", &RedisTls::default(), "x")
            .unwrap()
            .with_db(4);
        let info = direct.direct_client().unwrap().get_connection_info();
        assert_eq!(info.redis_settings().db(), 4);
        assert_eq!(info.redis_settings().password(), Some("pw"));
    }
}
