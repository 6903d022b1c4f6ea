//! Start-up and shutdown of the engine: keys, store, listeners, readiness, drain.
//!
//! Order: unseal keys (no fallback, promise 7) -> open the store -> start the writer -> bind
//! every listener (a bind error stops start-up before anything is accepted) -> accept -> READY.
//! Shutdown: stop accepting, let connections finish the message in hand within the grace
//! period, then let the writer commit what was submitted and stop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::keys::{self, KeyError};
use crate::listen::{self, conn::AckIds, ListenError, Shared};
use crate::store::{Store, StoreError};
use crate::telemetry::Counters;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// A running engine.
pub struct Engine {
    pub counters: Arc<Counters>,
    addrs: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    alive_rx: mpsc::Receiver<()>,
    writer: std::thread::JoinHandle<()>,
    grace: std::time::Duration,
}

impl Engine {
    /// Starts everything; returns once listeners are bound and the store is open.
    pub async fn start(settings: &Settings) -> Result<Engine, EngineError> {
        let mut sealer = keys::open_sealer(&settings.keys)?;
        tracing::info!(sealer = %sealer.describe(), "Unsealing keys.");
        let envelope = Arc::new(keys::load_message_keys(
            sealer.as_mut(),
            &settings.state_dir,
        )?);
        let store = Store::open(&settings.store)?;
        tracing::info!(path = %store.path().display(), "Store open.");
        let (handle, writer) = store.start_writer(envelope, &settings.store)?;
        let counters = Arc::new(Counters::default());
        let acks = Arc::new(AckIds::default());
        let mut bound = Vec::new();
        for l in &settings.listeners {
            bound.push(listen::bind(Shared {
                settings: l.clone(),
                store: handle.clone(),
                counters: Arc::clone(&counters),
                acks: Arc::clone(&acks),
            })?);
        }
        drop(handle);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (alive, alive_rx) = mpsc::channel(1);
        let mut addrs = Vec::new();
        for b in bound {
            if let Some(a) = b.local_addr() {
                addrs.push((b.name().to_string(), a));
            }
            tokio::spawn(listen::accept_loop(b, shutdown_rx.clone(), alive.clone()));
        }
        Ok(Engine {
            counters,
            addrs,
            shutdown,
            alive_rx,
            writer,
            grace: settings.shutdown_grace,
        })
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
        }
        // Each accept loop and connection task held a store handle; once they are gone the
        // writer commits what is queued and returns.
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        tracing::info!("Engine stopped.");
    }
}

/// Runs until SIGTERM or SIGINT, with sd_notify READY once started.
pub async fn run(settings: Settings) -> Result<(), EngineError> {
    let engine = Engine::start(&settings).await?;
    for (name, addr) in engine.local_addrs() {
        tracing::info!(listener = %name, address = %addr, "Ready.");
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    wait_for_signal().await;
    tracing::info!("Stopping: no new connections; finishing pending commits and ACKs.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    engine.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
