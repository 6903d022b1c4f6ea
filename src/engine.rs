//! Start-up and shutdown of the engine: keys, store, listeners, readiness, drain.
//!
//! Order: open the store (its log replays without keys) -> unseal keys (no fallback, promise
//! 7; a lost message key is never replaced while records need it) -> start the writer -> build
//! every destination's TLS client -> bind every listener, the control socket and the metrics
//! listener (any error stops start-up before anything is accepted) -> accept and forward -> READY.
//! Shutdown: stop accepting, let connections finish the message in hand within the grace
//! period, stop the forwarders (an unanswered message is sent again next start), then let the
//! writer commit what was submitted and stop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::audit::alerts::{cert_alerts, AlertSettings};
use crate::audit::{AuditKeys, Event, Severity};
use crate::config::{DestinationKind, Settings};
use crate::control;
use crate::forward::{self, DestStatus, Forwarder, SharedStatus};
use crate::keys::{self, KeyError};
use crate::listen::{self, conn::AckIds, ListenError, Shared};
use crate::reload::{ReloadError, Reloaded, Reloader, Swappable, TlsReload};
use crate::route::Router;
use crate::store::{AuditSink, StartAudit, Store, StoreError};
use crate::telemetry::Counters;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("destination {name}: {source}")]
    Destination {
        name: String,
        #[source]
        source: listen::tls::TlsError,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running engine.
pub struct Engine {
    pub counters: Arc<Counters>,
    addrs: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    /// Turned true when the grace period is over: open connections are closed.
    abort: watch::Sender<bool>,
    alive_rx: mpsc::Receiver<()>,
    writer: std::thread::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    control: control::Context,
    metrics_addr: Option<SocketAddr>,
    grace: std::time::Duration,
}

impl Engine {
    /// Starts everything; returns once listeners are bound and the store is open.
    pub async fn start(settings: &Settings) -> Result<Engine, EngineError> {
        let mut sealer = keys::open_sealer(&settings.keys)?;
        if matches!(
            settings.keys,
            crate::config::KeySettings::Development { .. }
        ) {
            tracing::warn!(sealer = %sealer.describe(), "Development key sealer: keys are wrapped under a file on this disk, not sealed in a TPM. Not for production.");
        }
        // The store opens first (its log replays without keys): whether it holds records
        // decides whether a missing message key may be generated.
        let store = Store::open(&settings.store)?;
        tracing::info!(path = %store.path().display(), "Store open.");
        tracing::info!(sealer = %sealer.describe(), "Unsealing keys.");
        // Keys generated on this start (the first one) are audited once the store takes records.
        let generated: Vec<&'static str> = [keys::KeyKind::Message, keys::KeyKind::Audit]
            .into_iter()
            .filter(|k| keys::sealed_ids(&settings.state_dir, *k).is_ok_and(|ids| ids.is_empty()))
            .map(|k| k.name())
            .collect();
        let unsealed = (|| {
            let has_records = store.has_records().map_err(|e| {
                KeyError::Random(format!("cannot tell whether the store holds records: {e}"))
            })?;
            let envelope = keys::load_message_keys_for_store(
                sealer.as_mut(),
                &settings.state_dir,
                has_records,
            )?;
            // The audit key (tokens, audit checkpoints): generated on the first start like the
            // message key, unsealed at every start so a wrong boot state stops start-up here.
            keys::ensure(sealer.as_mut(), &settings.state_dir, keys::KeyKind::Audit)?;
            let (_, audit_key) =
                keys::load_current(sealer.as_mut(), &settings.state_dir, keys::KeyKind::Audit)?;
            Ok::<_, KeyError>((envelope, audit_key))
        })();
        let (envelope, audit_key) = match unsealed {
            Ok(k) => k,
            Err(e) => {
                // A security event in its own right: recorded before the refusal.
                let event = Event::new("security.unseal_failed")
                    .severity(Severity::Alert)
                    .actor("engine")
                    .outcome("start refused")
                    .with("error", &e);
                if let Err(ae) = store.record_events(vec![event], None) {
                    tracing::error!(error = %ae, "Cannot record the unseal failure in the audit trail.");
                }
                return Err(e.into());
            }
        };
        let envelope = Arc::new(envelope);
        let audit_keys = Arc::new(AuditKeys::derive(&audit_key));
        drop(audit_key);
        // Release the TPM connection (swtpm and /dev/tpm0 serve one client at a time), so
        // `hl7edge keys ...` works beside the running engine.
        drop(sealer);
        tracing::info!(
            message_keys = ?envelope.key_ids(),
            current = envelope.current_key_id(),
            "Keys unsealed."
        );
        let dest_names: Vec<String> = settings
            .destinations
            .iter()
            .map(|d| d.name.clone())
            .collect();
        // Build every TLS client before anything starts, so a bad CA or key stops start-up.
        let mut upstreams = Vec::with_capacity(settings.destinations.len());
        let mut reloader = Reloader::default();
        for d in &settings.destinations {
            upstreams.push(match (&d.kind, &d.tls) {
                (DestinationKind::Mllps, Some(t)) => {
                    let up =
                        Swappable::new(Arc::new(forward::tls::upstream(t).map_err(|source| {
                            EngineError::Destination {
                                name: d.name.clone(),
                                source,
                            }
                        })?));
                    reloader.destination(&d.name, t, up.clone());
                    Some(up)
                }
                _ => None,
            });
        }
        record_start(&store, settings, &generated)?;
        let running = store.start(
            envelope,
            &settings.store,
            &dest_names,
            StartAudit {
                keys: Arc::clone(&audit_keys),
                settings: settings.audit.clone(),
            },
        )?;
        let counters = Arc::new(Counters::default());
        let acks = Arc::new(AckIds::default());
        let router = Arc::new(Router::new(&settings.routes, &settings.destinations));
        let mut bound = Vec::new();
        for l in &settings.listeners {
            let b = listen::bind(Shared {
                settings: l.clone(),
                store: running.handle.clone(),
                router: Arc::clone(&router),
                unrouted: settings.unrouted,
                counters: Arc::clone(&counters),
                acks: Arc::clone(&acks),
                audit: running.audit.clone(),
                audit_keys: Arc::clone(&audit_keys),
                security_seen: Default::default(),
            })?;
            if let (Some(current), Some(t)) = (b.tls(), &l.tls) {
                reloader.listener(&l.name, t, current);
            }
            bound.push(b);
        }
        let statuses: Vec<SharedStatus> = dest_names
            .iter()
            .map(|_| Arc::new(std::sync::Mutex::new(DestStatus::default())))
            .collect();
        let ctx = control::Context {
            handle: running.handle.clone(),
            reader: running.reader.clone(),
            dests: dest_names.clone(),
            statuses: statuses.clone(),
            live: Arc::clone(&running.live),
            quota: settings.store.quota,
            audit: running.audit.clone(),
            alerts_fired: Arc::clone(&running.alerts_fired),
            tls_reload: Arc::new(TlsReload::new(reloader, running.audit.clone())),
        };
        let control_listener =
            control::bind(&settings.control_socket).map_err(|source| EngineError::Control {
                path: settings.control_socket.clone(),
                source,
            })?;
        let metrics_listener = match settings.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| EngineError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for ((d, tls), status) in settings
            .destinations
            .iter()
            .zip(upstreams)
            .zip(statuses.iter())
        {
            let Some(wake) = running.live.wake.get(&d.name).cloned() else {
                continue;
            };
            let f = Forwarder {
                dest: d.clone(),
                tls,
                reader: running.reader.clone(),
                outcomes: running.outcomes.clone(),
                audit: running.audit.clone(),
                wake,
                status: Arc::clone(status),
            };
            tasks.push(tokio::spawn(f.run(shutdown_rx.clone())));
        }
        tasks.push(tokio::spawn(control::serve(
            control_listener,
            settings.control_socket.clone(),
            ctx.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(watch_certificates(
            cert_paths(settings),
            settings.audit.alerts.clone(),
            running.audit.clone(),
            shutdown_rx.clone(),
        )));
        if let Some(l) = metrics_listener {
            tasks.push(tokio::spawn(crate::metrics::serve(
                l,
                ctx.clone(),
                Arc::clone(&counters),
                shutdown_rx.clone(),
            )));
        }
        let (alive, alive_rx) = mpsc::channel(1);
        let mut addrs = Vec::new();
        for b in bound {
            if let Some(a) = b.local_addr() {
                addrs.push((b.name().to_string(), a));
            }
            tokio::spawn(listen::accept_loop(
                b,
                shutdown_rx.clone(),
                abort_rx.clone(),
                alive.clone(),
            ));
        }
        let writer = running.join;
        Ok(Engine {
            counters,
            addrs,
            shutdown,
            abort,
            alive_rx,
            writer,
            tasks,
            control: ctx,
            metrics_addr,
            grace: settings.shutdown_grace,
        })
    }

    /// Reads the TLS files the configuration names again and swaps them in for new
    /// connections, all or none (SIGHUP). Logged and audited (`tls.reloaded`,
    /// `tls.reload_failed`).
    pub async fn reload_tls(&self) -> Result<Reloaded, ReloadError> {
        Arc::clone(&self.control.tls_reload)
            .run_blocking("SIGHUP".into())
            .await
    }

    /// The control context: queue figures and dead-letter actions, as the socket serves them.
    pub fn control(&self) -> &control::Context {
        &self.control
    }

    /// The bound metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address of each listener, by name.
    pub fn local_addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// The bound address of the named listener.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// Stops accepting, drains connections and the writer.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(self.grace, self.alive_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "Connections still open after the grace period; closing them.");
            let _ = self.abort.send(true);
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), self.alive_rx.recv()).await;
        }
        // Forwarders, the control socket and metrics stop on the same signal.
        for t in self.tasks {
            let _ = t.await;
        }
        // Each accept loop, connection task and forwarder held a store handle or an outcome
        // sender; once they are gone the writer commits what is queued and returns (the
        // applier's last commit signs a checkpoint of the whole audit chain).
        self.control.audit.record(
            Event::new("engine.stopped")
                .actor("engine")
                .outcome("stopped"),
        );
        drop(self.control);
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        tracing::info!("Engine stopped.");
    }
}

/// Runs until SIGTERM or SIGINT, with sd_notify READY once started.
pub async fn run(settings: Settings) -> Result<(), EngineError> {
    // SIGHUP's default action ends the process: caught before the (possibly long) start, so a
    // reload asked for meanwhile is done once ready instead. SIGTERM during the start still
    // ends it at once (nothing is acknowledged yet).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let engine = Engine::start(&settings).await?;
    for (name, addr) in engine.local_addrs() {
        tracing::info!(listener = %name, address = %addr, "Ready.");
    }
    // Handlers first: a SIGTERM right after READY must drain, not kill the process.
    let mut signals = Signals::install(hangup);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    while let Wake::Reload = signals.wait().await {
        // systemd's reload protocol: RELOADING=1, then READY=1 once done, failed or not.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let _ = engine.reload_tls().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    tracing::info!("Stopping: no new connections; finishing pending commits and ACKs.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    engine.shutdown().await;
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP handlers, installed before READY is sent.
struct Signals {
    stop: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    hangup: Option<tokio::signal::unix::Signal>,
}

enum Wake {
    Stop,
    Reload,
}

impl Signals {
    fn install(hangup: Option<tokio::signal::unix::Signal>) -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let stop = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        Signals { stop, hangup }
    }

    async fn wait(&mut self) -> Wake {
        let hangup = async {
            match &mut self.hangup {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let stop = async {
            match &mut self.stop {
                Some((term, int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            () = stop => Wake::Stop,
            () = hangup => Wake::Reload,
        }
    }
}

/// Audits the start: `engine.started`, and `config.changed` (old and new hash, the file's
/// owner) when the configuration differs from the one last started with.
fn record_start(
    store: &Store,
    settings: &Settings,
    generated: &[&'static str],
) -> Result<(), StoreError> {
    let started = |old: Option<String>| {
        let mut events = vec![Event::new("engine.started")
            .actor("engine")
            .outcome("started")
            .with("version", env!("CARGO_PKG_VERSION"))
            .with("config", settings.source.display())
            .with("config_hash", &settings.config_hash)];
        if old.as_deref() != Some(settings.config_hash.as_str()) {
            use std::os::unix::fs::MetadataExt;
            let who = std::fs::metadata(&settings.source)
                .map(|m| format!("file owner uid:{}", m.uid()))
                .unwrap_or_else(|_| "unknown".into());
            events.push(
                Event::new("config.changed")
                    .severity(Severity::Warning)
                    .actor(who)
                    .outcome(if old.is_some() {
                        "changed"
                    } else {
                        "first start"
                    })
                    .with("file", settings.source.display())
                    .with("old_hash", old.as_deref().unwrap_or("-"))
                    .with("new_hash", &settings.config_hash),
            );
        }
        for key in generated {
            events.push(
                Event::new("security.key_generated")
                    .actor("engine")
                    .outcome("generated and sealed")
                    .with("key", key),
            );
        }
        events
    };
    store.record_with_config(
        Some(&settings.config_hash),
        started,
        Some(&settings.audit.alerts),
    )
}

/// Every certificate file the configuration names, with what it is.
fn cert_paths(settings: &Settings) -> Vec<(String, std::path::PathBuf)> {
    let mut out = Vec::new();
    for l in &settings.listeners {
        if let Some(t) = &l.tls {
            out.push((format!("listener {} certificate", l.name), t.cert.clone()));
            if let Some(ca) = &t.client_ca {
                out.push((format!("listener {} client CA", l.name), ca.clone()));
            }
        }
    }
    for d in &settings.destinations {
        if let Some(t) = &d.tls {
            if let Some(ca) = &t.ca {
                out.push((format!("destination {} CA", d.name), ca.clone()));
            }
            if let Some((cert, _)) = &t.client {
                out.push((
                    format!("destination {} client certificate", d.name),
                    cert.clone(),
                ));
            }
        }
    }
    out
}

/// Alerts on certificates expiring soon: at start, then daily.
async fn watch_certificates(
    certs: Vec<(String, std::path::PathBuf)>,
    alerts: AlertSettings,
    audit: AuditSink,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        for e in cert_alerts(&alerts, &certs, crate::store::now_ms()) {
            audit.record(e);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
