//! TLS to the backing stores (PostgreSQL, Redis): what a failed handshake
//! means, in words an operator can act on.
//!
//! sqlx and redis report a refused certificate as an I/O error wrapping
//! rustls' error (`invalid peer certificate: UnknownIssuer`); [`explain`]
//! finds it among the causes and says what failed and which setting to
//! check.

use std::error::Error;
use std::sync::Arc;

use rustls::{AlertDescription, CertificateError};

/// What the TLS failure behind `error` means, naming `ca_setting` (the
/// setting that holds the trusted CA, e.g. `sslrootcert`); `None` when no
/// TLS handshake failed.
pub fn explain(error: &(dyn Error + 'static), ca_setting: &str) -> Option<String> {
    let tls = rustls_cause(error)?;
    Some(match tls {
        rustls::Error::InvalidCertificate(reason) => {
            let (what, fix) = match reason {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                    "is not signed by a CA this coordinator trusts".to_owned(),
                    format!("check that {ca_setting} holds the CA that signed it"),
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => (
                    "is not valid for the host name connected to".to_owned(),
                    "connect by a name or address the certificate lists".to_owned(),
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                    "has expired".to_owned(),
                    "renew the server's certificate".to_owned(),
                ),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    ("is not valid yet".to_owned(), "check the clocks".to_owned())
                }
                other => (
                    format!("was refused ({other:?})"),
                    format!("check {ca_setting} and the server's certificate"),
                ),
            };
            format!("certificate verification failed: the server's certificate {what}; {fix}")
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied),
        ) => format!(
            "the server refused the TLS handshake ({alert:?}): it wants a client certificate \
             it trusts"
        ),
        other => format!("the TLS handshake failed: {other}"),
    })
}

/// The rustls error among `error` and its causes.
fn rustls_cause<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = wrapped_rustls(e) {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// `error` itself as a rustls error, looking into the wrappers whose
/// `source()` skips what they wrap.
fn wrapped_rustls<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    // An io::Error answers its inner error's source, not the inner error.
    if let Some(io) = error.downcast_ref::<std::io::Error>() {
        return io.get_ref().and_then(|inner| wrapped_rustls(inner));
    }
    // redis keeps the error it wraps behind an Arc.
    if let Some(shared) = error.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
        return wrapped_rustls(&**shared);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(tls: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, tls)
    }

    #[test]
    fn a_refused_certificate_is_found_behind_io_and_redis_errors() {
        let unknown = || rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let sqlx_error = sqlx::Error::Io(io(unknown()));
        let said = explain(&sqlx_error, "sslrootcert").unwrap();
        assert!(
            said.starts_with(
                "certificate verification failed: the server's certificate is not signed"
            ),
            "{said}"
        );
        assert!(said.contains("sslrootcert"), "{said}");

        let redis_error = redis::RedisError::from(io(unknown()));
        let said = explain(&redis_error, "redis_ca_file").unwrap();
        assert!(said.contains("certificate verification failed"), "{said}");
        assert!(said.contains("redis_ca_file"), "{said}");

        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let said = explain(&io(name), "sslrootcert").unwrap();
        assert!(said.contains("not valid for the host name"), "{said}");

        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let said = explain(&redis::RedisError::from(io(alert)), "redis_ca_file").unwrap();
        assert!(said.contains("client certificate"), "{said}");
    }

    #[test]
    fn other_errors_are_no_tls_failure() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(explain(&refused, "sslrootcert"), None);
        let redis_error = redis::RedisError::from(refused);
        assert_eq!(explain(&redis_error, "redis_ca_file"), None);
    }
}
