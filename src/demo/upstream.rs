//! The demo's and the benchmark's built-in "central hospital": an MLLP receiver (over mutual TLS
//! with the demo CA, or plaintext on loopback for the benchmark) that acknowledges every message
//! with AA (CA in enhanced mode), as an integration engine would. It keeps only the header fields
//! the demo prints (type and control ID), never content.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::client::MllpClient;
use crate::config::TlsSettings;
use crate::devpki::DevPki;
use crate::hl7::ack::{build_ack, AckParams, Outcome};
use crate::hl7::{hl7_timestamp, Message};

/// A running receiver; stops, with its connections, when dropped.
pub struct Hospital {
    pub addr: SocketAddr,
    /// Messages acknowledged.
    pub count: Arc<AtomicU64>,
    /// `(MSH-9, MSH-10)` of what arrived, in order (kept only when `keep` was asked).
    pub received: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hospital {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a receiver on `bind` (port 0: any free port). With `pki`, it serves MLLPS with the
/// demo server certificate and requires a client certificate from the demo CA.
pub async fn start(bind: SocketAddr, pki: Option<&DevPki>, keep: bool) -> anyhow::Result<Hospital> {
    let acceptor = match pki {
        Some(p) => Some(TlsAcceptor::from(crate::listen::tls::server_config(
            &TlsSettings {
                cert: p.server_cert.clone(),
                key: p.server_key.clone(),
                client_ca: Some(p.ca_cert.clone()),
                allowed_clients: Vec::new(),
            },
        )?)),
        None => None,
    };
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (c, r) = (Arc::clone(&count), Arc::clone(&received));
    let task = tokio::spawn(async move {
        // Connections live in the set, so stopping the receiver closes them too.
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            while conns.try_join_next().is_some() {}
            let _ = tcp.set_nodelay(true);
            let (c, r, acceptor) = (Arc::clone(&c), Arc::clone(&r), acceptor.clone());
            conns.spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(tcp).await {
                            serve(tls, &c, &r, keep).await;
                        }
                    }
                    None => serve(tcp, &c, &r, keep).await,
                }
            });
        }
    });
    Ok(Hospital {
        addr,
        count,
        received,
        task,
    })
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    count: &AtomicU64,
    received: &Mutex<Vec<(String, String)>>,
    keep: bool,
) {
    let mut conn = MllpClient::new(stream);
    let mut n = 0u64;
    while let Ok(payload) = conn.receive().await {
        let Ok(msg) = Message::parse(&payload) else {
            return;
        };
        n += 1;
        let ack_id = format!("HOSP{n}");
        let stamp = hl7_timestamp(std::time::SystemTime::now());
        let params = AckParams {
            timestamp: &stamp,
            control_id: &ack_id,
        };
        if keep {
            let h = msg.header();
            received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((h.message_type.to_string(), h.control_id.clone()));
        }
        count.fetch_add(1, Ordering::AcqRel);
        if let Some(ack) = build_ack(&msg, &Outcome::Accepted, &params) {
            if conn.send(&ack).await.is_err() {
                return;
            }
        }
    }
}
