//! TLS servers of the tests' own: a PostgreSQL cluster and a Redis server,
//! each on a free port of 127.0.0.1, configured for TLS with certificates
//! made here ([`Pki`]), and stopped (their process group killed) when
//! dropped, whatever happened in the test.
//!
//! They need the real server binaries: `redis-server` (built with TLS) on
//! the PATH, and PostgreSQL's `initdb` and `postgres` (in
//! `/usr/lib/postgresql/<version>/bin` as Debian installs them, or on the
//! PATH). A missing binary fails the test with a message saying so.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::wait_for_blocking;

/// A test CA, a server certificate it signed (for `localhost` and
/// `127.0.0.1`), and a second CA that signed nothing the servers use.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA that signed the servers' certificates (PEM).
    pub ca: PathBuf,
    /// Another CA: verifying a server against it must fail.
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca("appproxy test CA");
        let (other_pem, _) = ca("appproxy other CA");
        let ca = dir.path().join("ca.pem");
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        std::fs::write(&other_ca, other_pem).unwrap();
        let mut pki = Pki {
            server_cert: dir.path().join("server.crt"),
            server_key: dir.path().join("server.key"),
            dir,
            ca,
            other_ca,
            issuer,
        };
        let (cert, key) = pki.issue(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(&pki.server_cert, cert).unwrap();
        std::fs::write(&pki.server_key, key).unwrap();
        pki.set_private(&pki.server_key.clone());
        pki
    }

    /// A client certificate for `common_name` (PostgreSQL's `cert`
    /// authentication takes the user name from it), signed by the CA:
    /// (certificate file, key file).
    pub fn client(&mut self, common_name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(common_name, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let cert_path = self.dir.path().join(format!("{common_name}.crt"));
        let key_path = self.dir.path().join(format!("{common_name}.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        self.set_private(&key_path);
        (cert_path, key_path)
    }

    fn issue(
        &mut self,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn set_private(&self, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A self-signed CA: its certificate (PEM) and what signs with it.
fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// We are root (as CI is): PostgreSQL must then run as `postgres`.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

/// A server process in a process group of its own, its output in `log`.
struct Server {
    child: Child,
    log: PathBuf,
    what: &'static str,
}

impl Server {
    fn spawn(what: &'static str, mut command: Command, log: PathBuf, hint: &str) -> Server {
        let out = std::fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {what} ({:?}): {e}; {hint}",
                command.get_program()
            )
        });
        Server { child, log, what }
    }

    fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits until the log says `ready`; `None` if the server exited first
    /// (say, its port was taken meanwhile).
    fn wait_ready(&mut self, ready: &str) -> Option<()> {
        let Server { child, log, what } = self;
        let waited = std::fmt::from_fn(|f| write!(f, "{what} to start:\n{}", read_log(log)));
        wait_for_blocking(waited, || {
            if read_log(log).contains(ready) {
                return Some(Some(()));
            }
            // Exited first: not ready, ever.
            child.try_wait().ok().flatten().map(|_| None)
        })
    }

    /// `signal` to the whole process group.
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A fast shutdown first (PostgreSQL's SIGINT), then SIGKILL to
        // whatever of the group is left.
        self.signal("-INT");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.signal("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis server that speaks TLS only (`--port 0`), with a password.
pub struct TlsRedis {
    pub port: u16,
    pub password: &'static str,
    server: Server,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    /// `auth_clients`: Redis' `--tls-auth-clients` (`no`, or `yes` to
    /// require a client certificate signed by the CA).
    pub fn start(pki: &Pki, auth_clients: &str) -> TlsRedis {
        let password = "redis-tls-test-password";
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let mut command = Command::new("redis-server");
            command.args([
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                pki.server_cert.to_str().unwrap(),
                "--tls-key-file",
                pki.server_key.to_str().unwrap(),
                "--tls-ca-cert-file",
                pki.ca.to_str().unwrap(),
                "--tls-auth-clients",
                auth_clients,
                "--requirepass",
                password,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.path().to_str().unwrap(),
            ]);
            let mut server = Server::spawn(
                "redis-server",
                command,
                dir.path().join("redis.log"),
                "install redis-server, built with TLS (Debian's redis-server package is)",
            );
            if server.wait_ready("Ready to accept connections").is_some() {
                return TlsRedis {
                    port,
                    password,
                    server,
                    _dir: dir,
                };
            }
            let log = server.log();
            assert!(
                log.contains("Address already in use"),
                "redis-server with TLS exited:\n{log}"
            );
        }
        panic!("no free port for redis-server after 5 tries");
    }

    /// `rediss://:<password>@127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("rediss://:{}@127.0.0.1:{}/0", self.password, self.port)
    }

    pub fn log(&self) -> String {
        self.server.log()
    }
}

/// The directory of PostgreSQL's server binaries: Debian's
/// `/usr/lib/postgresql/<newest>/bin`, else wherever `initdb` is on the PATH.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server binaries (initdb, postgres) are neither in \
             /usr/lib/postgresql/<version>/bin nor on the PATH: install the PostgreSQL server \
             (the TLS tests start a cluster of their own)"
        )
    })
}

/// A PostgreSQL cluster of its own on 127.0.0.1:`port`: TLS with the
/// [`Pki`]'s server certificate, and a pg_hba that admits TLS only:
/// `cert` (client certificate) authentication for the role `certuser`,
/// trust for everyone else, and plaintext refused.
pub struct TlsPostgres {
    pub port: u16,
    server: Server,
    dir: tempfile::TempDir,
}

impl TlsPostgres {
    /// The role that authenticates with a client certificate.
    pub const CERT_USER: &str = "certuser";

    pub fn start(pki: &Pki) -> TlsPostgres {
        let bin = postgres_bin_dir();
        let root = running_as_root();
        // As root, the server runs as `postgres`, which must own its files.
        let as_server_user = |program: &Path| {
            if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let sockets = dir.path().join("sockets");
            std::fs::create_dir(&sockets).unwrap();
            let ssl = dir.path().join("ssl");
            std::fs::create_dir(&ssl).unwrap();
            for (from, to) in [
                (&pki.server_cert, "server.crt"),
                (&pki.server_key, "server.key"),
                (&pki.ca, "ca.pem"),
            ] {
                std::fs::copy(from, ssl.join(to)).unwrap();
            }
            if root {
                let chown = Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path())
                    .status()
                    .unwrap();
                assert!(chown.success(), "chown the cluster's directory to postgres");
            }
            let initdb = as_server_user(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot run initdb in {}: {e}", bin.display()));
            assert!(
                initdb.status.success(),
                "initdb failed:\n{}{}",
                String::from_utf8_lossy(&initdb.stdout),
                String::from_utf8_lossy(&initdb.stderr)
            );
            let hba = data.join("pg_hba.conf");
            std::fs::write(
                &hba,
                format!(
                    "local all all trust\n\
                     hostssl all {user} 127.0.0.1/32 cert\n\
                     hostssl all all 127.0.0.1/32 trust\n\
                     hostnossl all all 127.0.0.1/32 reject\n",
                    user = TlsPostgres::CERT_USER
                ),
            )
            .unwrap();
            if root {
                let _ = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&hba)
                    .status();
            }
            let port = free_port();
            let mut command = as_server_user(&bin.join("postgres"));
            command.arg("-D").arg(&data).args([
                "-p",
                &port.to_string(),
                "-k",
                sockets.to_str().unwrap(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=on",
                "-c",
                &format!("ssl_cert_file={}", ssl.join("server.crt").display()),
                "-c",
                &format!("ssl_key_file={}", ssl.join("server.key").display()),
                "-c",
                &format!("ssl_ca_file={}", ssl.join("ca.pem").display()),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=40",
            ]);
            let mut server = Server::spawn(
                "postgres",
                command,
                dir.path().join("postgres.log"),
                "install the PostgreSQL server",
            );
            if server
                .wait_ready("database system is ready to accept connections")
                .is_some()
            {
                let cluster = TlsPostgres { port, server, dir };
                let user = TlsPostgres::CERT_USER;
                cluster.psql(&format!("CREATE ROLE {user} LOGIN SUPERUSER"));
                cluster.psql(&format!("CREATE DATABASE {user} OWNER {user}"));
                return cluster;
            }
            let log = server.log();
            assert!(
                log.contains("Address already in use") || log.contains("could not bind"),
                "postgres exited:\n{log}"
            );
        }
        panic!("no free port for postgres after 5 tries");
    }

    /// Runs `sql` as `postgres` over the Unix socket (no TLS involved).
    fn psql(&self, sql: &str) {
        let sockets = self.dir.path().join("sockets");
        let bin = postgres_bin_dir();
        let psql = bin.join("psql");
        let program = if psql.exists() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(program)
            .args(["-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&sockets)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `postgres://<user>[:<password>]@127.0.0.1:<port>/<db>?<query>`.
    pub fn url(&self, user_and_password: &str, db: &str, query: &str) -> String {
        format!(
            "postgres://{user_and_password}@127.0.0.1:{}/{db}?{query}",
            self.port
        )
    }

    pub fn log(&self) -> String {
        self.server.log()
    }
}
