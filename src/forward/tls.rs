//! TLS for `mllps` destinations: TLS 1.2 and 1.3, the server verified against the configured CA
//! bundle or the platform's trust store, an optional SPKI pin checked before anything is sent,
//! and a client certificate for mutual TLS.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::ClientTls;
use crate::listen::tls::{load_certs, load_key, provider, TlsError};

/// What a forwarder needs to open TLS connections to its destination.
#[derive(Clone)]
pub struct Upstream {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub pins: Vec<[u8; 32]>,
}

/// Builds the client side of one destination; errors name the file or setting.
pub fn upstream(t: &ClientTls) -> Result<Upstream, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &t.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| TlsError::Certs {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| TlsError::Config(format!("platform trust store: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    let config = match &t.client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?,
        None => builder.with_no_client_auth(),
    };
    let server_name = ServerName::try_from(t.server_name.clone())
        .map_err(|_| TlsError::Config(format!("{:?} is not a valid server name", t.server_name)))?;
    Ok(Upstream {
        config: Arc::new(config),
        server_name,
        pins: t.pins.clone(),
    })
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(Sha256::digest(x509.tbs_certificate.subject_pki.raw).into())
}

/// Checks the server's key against the pins; the error names the key that was presented.
pub fn check_pin(pins: &[[u8; 32]], chain: Option<&[CertificateDer<'_>]>) -> Result<(), String> {
    if pins.is_empty() {
        return Ok(());
    }
    let got = chain
        .and_then(|c| c.first())
        .and_then(spki_sha256)
        .ok_or_else(|| "the server presented no readable certificate".to_string())?;
    if pins.contains(&got) {
        Ok(())
    } else {
        use base64::Engine as _;
        Err(format!(
            "server public key sha256/{} matches no pin_sha256: nothing sent",
            base64::engine::general_purpose::STANDARD.encode(got)
        ))
    }
}
