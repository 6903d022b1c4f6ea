//! TLS for `mllps` listeners: TLS 1.2 and 1.3 only (rustls has nothing older), client
//! certificates verified against the listener's CA, and an optional allow-list of client
//! identities checked after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("cannot read the private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCerts { path: PathBuf },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// The crypto provider the whole engine uses (ring); installed once at start.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: path.to_path_buf(),
            reason: pem_reason(e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Why a PEM file could not be read, in words that never quote the file: a parse error
/// would print the offending line, and a file holding a key beside its certificates would
/// put key material in a log or the audit trail.
fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM section found".into(),
        _ => "not valid PEM".into(),
    }
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). The error never includes key bytes.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key found".into(),
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "not a PEM private key".into(),
        },
    })
}

/// Reads a PEM CA bundle into a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::Certs {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Builds the server configuration of one listener.
pub fn server_config(t: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let roots = load_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(load_certs(&t.cert)?, load_key(&t.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", t.cert.display())))?;
    Ok(Arc::new(config))
}

/// The identities a client certificate presents: `CN=...` and its SANs as `DNS:`, `IP:`,
/// `URI:`, `EMAIL:`.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = x509
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| format!("CN={cn}"))
        .collect();
    // The whole subject, RDNs in certificate order as `openssl x509 -subject -nameopt
    // RFC2253`-style text: `SUBJECT:CN=ehr01, O=Clinic`.
    out.push(format!("SUBJECT:{}", x509.subject()));
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push(format!("DNS:{d}")),
                GeneralName::URI(u) => out.push(format!("URI:{u}")),
                GeneralName::RFC822Name(e) => out.push(format!("EMAIL:{e}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Whether a client presenting `ids` is allowed by `allowed` (empty allows all).
pub fn client_allowed(allowed: &[String], ids: &[String]) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|a| ids.iter().any(|i| i.eq_ignore_ascii_case(a)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod identity_tests {
    use super::*;

    #[test]
    fn identities_name_cn_whole_subject_and_sans() {
        let mut p = rcgen::CertificateParams::new(vec!["lab.clinic.example".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "ehr01");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Clinic");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let ids = identities(cert.der());
        assert!(ids.contains(&"CN=ehr01".to_string()), "{ids:?}");
        assert!(
            ids.contains(&"DNS:lab.clinic.example".to_string()),
            "{ids:?}"
        );
        let subject = ids.iter().find(|i| i.starts_with("SUBJECT:")).unwrap();
        assert!(
            subject.contains("CN=ehr01") && subject.contains("O=Clinic"),
            "{subject}"
        );
        assert!(client_allowed(std::slice::from_ref(subject), &ids));
        assert!(!client_allowed(&["SUBJECT:CN=ehr01, O=Other".into()], &ids));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod load_tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_never_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        for text in [
            "-----BEGIN CERTIFICATE-----\nMIIB\nSECRETKEY@@@\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----BEGIN PRIVATE KEY-----SECRETKEY\n",
            "-----BEGIN PRIVATE KEY-----SECRETKEY\n-----END PRIVATE KEY-----\n",
            "-----BEGIN CERTIFICATE-----\nSECRETKEY\n",
        ] {
            std::fs::write(&path, text).unwrap();
            for err in [
                load_certs(&path).map(|_| ()).unwrap_err().to_string(),
                load_roots(&path).map(|_| ()).unwrap_err().to_string(),
                load_key(&path).map(|_| ()).unwrap_err().to_string(),
            ] {
                assert!(err.contains(&path.display().to_string()), "{err}");
                // Neither as text nor as the byte list a parse error prints.
                assert!(!err.contains("SECRET"), "{err}");
                assert!(!err.contains("83, 69, 67, 82, 69, 84"), "{err}");
            }
        }
    }
}
