//! TLS for `mllps` destinations: TLS 1.2 and 1.3, the server verified against the configured CA
//! bundle or the platform's trust store, an optional SPKI pin checked before anything is sent,
//! and a client certificate for mutual TLS.
//!
//! In TLS 1.3 the client's handshake ends before the server has checked the client's
//! certificate: a server refusing it (or refusing a client that has none) closes the connection
//! only after our side is done. So that such a refusal is a connection failure, not a failed
//! delivery attempt of the first message, a connection on which the server asked for a client
//! certificate waits before sending anything until the server shows it accepted us (a TLS 1.3
//! session ticket, which servers send once the handshake is complete on their side, or any data),
//! or closes (refused), or [`CONFIRM_WAIT`] passes (a server that sends no tickets).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption,
    Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, NamedGroup, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::ClientTls;
use crate::listen::tls::{load_certs, load_key, load_roots, provider, TlsError};

/// What a forwarder needs to open TLS connections to its destination.
#[derive(Clone)]
pub struct Upstream {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub pins: Vec<[u8; 32]>,
    /// What the handshakes of this destination's (one at a time) connections showed.
    pub watch: Arc<HandshakeWatch>,
}

/// Longest wait for a TLS 1.3 server to confirm it accepted our client certificate.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// Observes the handshakes of one destination: whether the server asked for a client
/// certificate, and session tickets received.
#[derive(Debug, Default)]
pub struct HandshakeWatch {
    cert_requested: AtomicBool,
    /// Whether a client certificate is configured.
    has_cert: bool,
    tickets: AtomicU64,
    ticket: Notify,
}

impl HandshakeWatch {
    /// Call before each connection; returns the ticket count to compare against.
    pub fn begin(&self) -> u64 {
        self.cert_requested.store(false, Ordering::Release);
        self.tickets.load(Ordering::Acquire)
    }

    /// Whether the server asked for a client certificate in the last handshake.
    pub fn cert_requested(&self) -> bool {
        self.cert_requested.load(Ordering::Acquire)
    }

    pub fn has_cert(&self) -> bool {
        self.has_cert
    }
}

/// After a TLS 1.3 handshake in which the server asked for a client certificate: waits until
/// the server confirms (a session ticket after `tickets_before`, or data), or [`CONFIRM_WAIT`]
/// passes. `Err` when the server closed or aborted the connection instead: it refused us.
pub async fn confirm_accepted<S: AsyncRead + Unpin>(
    stream: &mut S,
    watch: &HandshakeWatch,
    tickets_before: u64,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CONFIRM_WAIT;
    let mut byte = [0u8; 1];
    loop {
        if watch.tickets.load(Ordering::Acquire) > tickets_before {
            return Ok(());
        }
        tokio::select! {
            r = stream.read(&mut byte) => return match r {
                // The server spoke first (MLLP servers do not): it accepted the connection; a
                // stray byte before any frame is discarded like any bytes outside frames.
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("the connection was closed".to_string()),
                Err(e) => Err(e.to_string()),
            },
            _ = watch.ticket.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::debug!("No TLS 1.3 session ticket from the destination; assuming it accepted our certificate.");
                return Ok(());
            }
        }
    }
}

/// Sends the configured client certificate, if any, and notes that the server asked for one.
#[derive(Debug)]
struct WatchingResolver {
    key: Option<Arc<CertifiedKey>>,
    watch: Arc<HandshakeWatch>,
}

impl ResolvesClientCert for WatchingResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.watch.cert_requested.store(true, Ordering::Release);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// rustls's in-memory session cache, counting TLS 1.3 tickets as they arrive.
#[derive(Debug)]
struct TicketCounter {
    inner: ClientSessionMemoryCache,
    watch: Arc<HandshakeWatch>,
}

impl ClientSessionStore for TicketCounter {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value);
        self.watch.tickets.fetch_add(1, Ordering::AcqRel);
        self.watch.ticket.notify_one();
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// Builds the client side of one destination; errors name the file or setting.
pub fn upstream(t: &ClientTls) -> Result<Upstream, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &t.ca {
        Some(ca) => builder.with_root_certificates(load_roots(ca)?),
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider))
                .map_err(|e| TlsError::Config(format!("platform trust store: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    let key = match &t.client {
        Some((cert, key)) => Some(Arc::new(
            CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, &provider)
                .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?,
        )),
        None => None,
    };
    let watch = Arc::new(HandshakeWatch {
        has_cert: key.is_some(),
        ..HandshakeWatch::default()
    });
    let mut config = builder.with_client_cert_resolver(Arc::new(WatchingResolver {
        key,
        watch: Arc::clone(&watch),
    }));
    config.resumption = Resumption::store(Arc::new(TicketCounter {
        inner: ClientSessionMemoryCache::new(32),
        watch: Arc::clone(&watch),
    }));
    let server_name = ServerName::try_from(t.server_name.clone())
        .map_err(|_| TlsError::Config(format!("{:?} is not a valid server name", t.server_name)))?;
    Ok(Upstream {
        config: Arc::new(config),
        server_name,
        pins: t.pins.clone(),
        watch,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_server_closing_after_the_handshake_refused_us_and_one_speaking_accepted_us() {
        let watch = HandshakeWatch::default();
        let (mut ours, theirs) = tokio::io::duplex(64);
        drop(theirs);
        assert!(confirm_accepted(&mut ours, &watch, watch.begin())
            .await
            .is_err());

        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs.write_all(b"x").await.unwrap();
        assert!(confirm_accepted(&mut ours, &watch, watch.begin())
            .await
            .is_ok());

        // A ticket that arrived during the handshake counts.
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let before = watch.begin();
        watch.tickets.fetch_add(1, Ordering::AcqRel);
        assert!(confirm_accepted(&mut ours, &watch, before).await.is_ok());
    }
}
