//! Listeners: bind (optionally to an interface with SO_BINDTODEVICE), admit connections
//! (source allow-list, connection limit, TLS handshake and client allow-list) and hand each
//! connection to [`conn::serve`].
//!
//! Invariants (promise 4 and 6):
//! - A refused source, an over-limit connection or a failed handshake is closed, counted and
//!   logged with the peer, never with content; it never affects other connections.
//! - At shutdown, accept loops stop first; connections finish the message in hand (its commit and
//!   ACK) and close.

pub mod conn;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerKind, ListenerSettings};
use crate::reload::Swappable;
use crate::store::StoreHandle;
use crate::telemetry::{add, Counters};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener {name:?}: cannot bind {address}{}: {source}", .interface.as_ref().map(|i| format!(" on interface {i}")).unwrap_or_default())]
    Bind {
        name: String,
        address: SocketAddr,
        interface: Option<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {name:?}: {source}")]
    Tls {
        name: String,
        #[source]
        source: tls::TlsError,
    },
}

/// What every connection of a listener shares.
pub struct Shared {
    pub settings: ListenerSettings,
    pub store: StoreHandle,
    pub router: Arc<crate::route::Router>,
    pub unrouted: crate::config::Unrouted,
    pub counters: Arc<Counters>,
    pub acks: Arc<conn::AckIds>,
    /// Audit trail of intake and security events.
    pub audit: crate::store::AuditSink,
    /// MRN tokens.
    pub audit_keys: Arc<crate::audit::AuditKeys>,
    /// Rate limit of security records per peer.
    pub security_seen: SecuritySeen,
}

impl Shared {
    /// Records a security event of this listener: a refused or failed peer. Per peer address
    /// and event type, the first [`SECURITY_BURST`] of every [`SECURITY_WINDOW`] are recorded
    /// one by one (enough for the failed-authentication alert); the rest are folded into the
    /// next record, which says how many, so a scanner cannot grow the audit trail (kept for
    /// years) without bound. The counters count every one.
    fn security(&self, event: &'static str, peer: &SocketAddr, reason: &str) {
        let now = std::time::Instant::now();
        let folded = {
            let mut seen = self.security_seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= SECURITY_PEERS {
                seen.retain(|_, w| now.duration_since(w.start) < SECURITY_WINDOW);
            }
            let full = seen.len() >= SECURITY_PEERS;
            match seen.get_mut(&(peer.ip(), event)) {
                Some(w) if now.duration_since(w.start) >= SECURITY_WINDOW => {
                    let folded = w.folded;
                    *w = SecurityWindow {
                        start: now,
                        recorded: 1,
                        folded: 0,
                    };
                    folded
                }
                Some(w) if w.recorded >= SECURITY_BURST => {
                    w.folded += 1;
                    return;
                }
                Some(w) => {
                    w.recorded += 1;
                    0
                }
                None if full => return,
                None => {
                    seen.insert(
                        (peer.ip(), event),
                        SecurityWindow {
                            start: now,
                            recorded: 1,
                            folded: 0,
                        },
                    );
                    0
                }
            }
        };
        let mut e = crate::audit::Event::new(event)
            .severity(crate::audit::Severity::Warning)
            .listener(self.settings.name.as_str())
            .actor(peer.to_string())
            .outcome("refused")
            .with("reason", reason);
        if folded > 0 {
            e = e.with("folded_before", folded);
        }
        self.audit.record(e);
    }
}

/// Per peer address and event type, this many security records per window one by one...
const SECURITY_BURST: u64 = 20;
/// ...per this window.
const SECURITY_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses tracked at once; past it, new addresses are not recorded until old ones expire.
const SECURITY_PEERS: usize = 4096;

/// One peer address's security records in the current window.
#[derive(Debug)]
pub struct SecurityWindow {
    start: std::time::Instant,
    recorded: u64,
    folded: u64,
}

/// Each peer address's window, per event type.
pub type SecuritySeen =
    std::sync::Mutex<std::collections::HashMap<(std::net::IpAddr, &'static str), SecurityWindow>>;

/// A bound listener, not yet accepting.
pub struct Bound {
    listener: TcpListener,
    tls: Option<Swappable<rustls::ServerConfig>>,
    shared: Arc<Shared>,
}

impl Bound {
    /// Its TLS configuration, which a reload replaces for new connections.
    pub fn tls(&self) -> Option<Swappable<rustls::ServerConfig>> {
        self.tls.clone()
    }
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
    pub fn name(&self) -> &str {
        &self.shared.settings.name
    }
}

/// Binds a listener's socket and loads its TLS configuration.
pub fn bind(shared: Shared) -> Result<Bound, ListenError> {
    let s = &shared.settings;
    let bind_err = |source| ListenError::Bind {
        name: s.name.clone(),
        address: s.address,
        interface: s.interface.clone(),
        source,
    };
    let tls = match (&s.kind, &s.tls) {
        (ListenerKind::Mllps, Some(t)) => {
            Some(Swappable::new(tls::server_config(t).map_err(|source| {
                ListenError::Tls {
                    name: s.name.clone(),
                    source,
                }
            })?))
        }
        _ => None,
    };
    let domain = socket2::Domain::for_address(s.address);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(bind_err)?;
    sock.set_reuse_address(true).map_err(bind_err)?;
    if let Some(ifname) = &s.interface {
        sock.bind_device(Some(ifname.as_bytes()))
            .map_err(bind_err)?;
    }
    sock.bind(&s.address.into()).map_err(bind_err)?;
    sock.listen(1024).map_err(bind_err)?;
    sock.set_nonblocking(true).map_err(bind_err)?;
    let listener = TcpListener::from_std(sock.into()).map_err(bind_err)?;
    Ok(Bound {
        listener,
        tls,
        shared: Arc::new(shared),
    })
}

/// Accepts connections until `shutdown` turns true. Every connection task holds a clone of
/// `alive`; the engine waits for all of them to drop at shutdown, and turns `abort` true when
/// its grace period is over: connections still open then are closed where they stand (a
/// message whose ACK was not sent is sent again by its sender).
pub async fn accept_loop(
    bound: Bound,
    mut shutdown: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let Bound {
        listener,
        tls,
        shared,
    } = bound;
    let name = shared.settings.name.clone();
    let limit = Arc::new(Semaphore::new(shared.settings.max_connections));
    tracing::info!(listener = %name, kind = shared.settings.kind.as_str(),
        address = %shared.settings.address,
        interface = shared.settings.interface.as_deref().unwrap_or("-"), "Listening.");
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = %name, error = %e, "Accept failed.");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let counters = &shared.counters;
        if !shared.settings.allows(peer.ip()) {
            add(&counters.connections_refused_source, 1);
            tracing::warn!(listener = %name, peer = %peer, "Connection refused: source not in the allow-list.");
            shared.security("connection.refused", &peer, "source not in the allow-list");
            continue;
        }
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            add(&counters.connections_over_limit, 1);
            tracing::warn!(listener = %name, peer = %peer,
                max_connections = shared.settings.max_connections, "Connection refused: listener at its connection limit.");
            shared.security(
                "connection.refused",
                &peer,
                "listener at its connection limit",
            );
            continue;
        };
        add(&counters.connections_accepted, 1);
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.current()));
        let shutdown = shutdown.clone();
        let alive = alive.clone();
        let mut abort = abort.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _alive = alive;
            let name = shared.settings.name.clone();
            tokio::select! {
                () = serve_one(stream, peer, tls, shared, shutdown) => {}
                _ = abort.wait_for(|a| *a) => {
                    tracing::warn!(listener = %name, peer = %peer, "Connection closed: still open when the shutdown grace period ended.");
                }
            }
        });
    }
    tracing::info!(listener = %name, "Stopped accepting.");
}

/// One accepted connection: the TLS handshake and client allow-list when it is `mllps`, then
/// the MLLP conversation.
async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    match tls {
        None => conn::serve(stream, peer.to_string(), &shared, shutdown).await,
        Some(acceptor) => {
            let hs =
                tokio::time::timeout(shared.settings.idle_timeout, acceptor.accept(stream)).await;
            let tls_stream = match hs {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    add(&shared.counters.tls_handshake_failures, 1);
                    tracing::warn!(listener = %shared.settings.name, peer = %peer, error = %e, "TLS handshake failed.");
                    shared.security("auth.failed", &peer, &format!("TLS handshake failed: {e}"));
                    return;
                }
                Err(_) => {
                    add(&shared.counters.tls_handshake_failures, 1);
                    tracing::warn!(listener = %shared.settings.name, peer = %peer, "TLS handshake timed out.");
                    shared.security("auth.failed", &peer, "TLS handshake timed out");
                    return;
                }
            };
            let ids = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(tls::identities)
                .unwrap_or_default();
            let allowed = shared
                .settings
                .tls
                .as_ref()
                .map(|t| tls::client_allowed(&t.allowed_clients, &ids))
                .unwrap_or(true);
            if !allowed {
                add(&shared.counters.tls_client_not_allowed, 1);
                tracing::warn!(listener = %shared.settings.name, peer = %peer, client = ?ids,
                            "TLS client refused: identity not in allowed_clients.");
                shared.security(
                    "auth.failed",
                    &peer,
                    &format!("client identity not in allowed_clients: {}", ids.join(" ")),
                );
                return;
            }
            let who = match ids.first() {
                Some(id) => format!("{peer} ({id})"),
                None => peer.to_string(),
            };
            conn::serve(tls_stream, who, &shared, shutdown).await
        }
    }
}
