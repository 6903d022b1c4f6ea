//! Certificate rotation without a restart: on SIGHUP the engine reads again the TLS files its
//! configuration names (each `mllps` listener's certificate, key and client CA; each `mllps`
//! destination's CA and client certificate) and swaps them in for new connections. Open
//! connections keep the configuration they were made with.
//!
//! A reload is all or nothing: when any file fails to load, nothing changes and the failure
//! names the listener or destination and the file. Other configuration changes need a restart
//! (the file is not read again).

use std::sync::{Arc, RwLock};

use rustls::ServerConfig;

use crate::audit::{Event, Severity};
use crate::config::{ClientTls, TlsSettings};
use crate::forward::tls::Upstream;
use crate::listen::tls::TlsError;

/// A value each new connection takes a snapshot of, and a reload replaces.
pub struct Swappable<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Swappable<T> {
    fn clone(&self) -> Self {
        Swappable(Arc::clone(&self.0))
    }
}

impl<T> Swappable<T> {
    pub fn new(value: Arc<T>) -> Self {
        Swappable(Arc::new(RwLock::new(value)))
    }

    /// The current value.
    pub fn current(&self) -> Arc<T> {
        // A writer only ever stores a whole Arc, so a poisoned lock still holds a valid value.
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

enum Slot {
    Listener {
        name: String,
        tls: TlsSettings,
        current: Swappable<ServerConfig>,
    },
    Destination {
        name: String,
        tls: ClientTls,
        current: Swappable<Upstream>,
    },
}

/// A reload with its log line and audit record: what SIGHUP and `hl7edge tls reload` run.
pub struct TlsReload {
    reloader: Reloader,
    audit: crate::store::AuditSink,
}

impl TlsReload {
    pub fn new(reloader: Reloader, audit: crate::store::AuditSink) -> Self {
        TlsReload { reloader, audit }
    }

    /// Reloads for `actor` (`SIGHUP`, or `uid:N` on the control socket); logged and audited
    /// (`tls.reloaded`, `tls.reload_failed`). Reads files: call it off the runtime's workers.
    pub fn run(&self, actor: &str) -> Result<Reloaded, ReloadError> {
        let result = self.reloader.reload();
        match &result {
            Ok(done) => {
                tracing::info!(actor, listeners = ?done.listeners, destinations = ?done.destinations,
                    "TLS certificates, keys and CAs reloaded; new connections use them (forwarders reconnect; open listener connections keep theirs).");
                self.audit.record(
                    Event::new("tls.reloaded")
                        .actor(actor)
                        .outcome("reloaded")
                        .with("listeners", done.listeners.join(" "))
                        .with("destinations", done.destinations.join(" ")),
                );
            }
            Err(e) => {
                tracing::error!(actor, error = %e, "TLS reload failed; nothing changed.");
                self.audit.record(
                    Event::new("tls.reload_failed")
                        .severity(Severity::Warning)
                        .actor(actor)
                        .outcome("nothing changed")
                        .with("error", e),
                );
            }
        }
        result
    }

    /// [`TlsReload::run`] on a blocking thread, for the runtime's tasks (SIGHUP, the control
    /// socket).
    pub async fn run_blocking(self: Arc<Self>, actor: String) -> Result<Reloaded, ReloadError> {
        match tokio::task::spawn_blocking(move || self.run(&actor)).await {
            Ok(r) => r,
            // Only if the reload panicked, which it does not; nothing was swapped then.
            Err(e) => Err(ReloadError::Aborted(e.to_string())),
        }
    }
}

/// What a successful reload replaced: the listeners' and destinations' names.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    pub listeners: Vec<String>,
    pub destinations: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("listener {name}: {source}")]
    Listener { name: String, source: TlsError },
    #[error("destination {name}: {source}")]
    Destination { name: String, source: TlsError },
    #[error("the reload did not complete: {0}")]
    Aborted(String),
}

/// Every TLS configuration the engine serves or connects with, by listener and destination.
#[derive(Default)]
pub struct Reloader {
    slots: Vec<Slot>,
}

impl Reloader {
    pub fn listener(&mut self, name: &str, tls: &TlsSettings, current: Swappable<ServerConfig>) {
        self.slots.push(Slot::Listener {
            name: name.to_string(),
            tls: tls.clone(),
            current,
        });
    }

    pub fn destination(&mut self, name: &str, tls: &ClientTls, current: Swappable<Upstream>) {
        self.slots.push(Slot::Destination {
            name: name.to_string(),
            tls: tls.clone(),
            current,
        });
    }

    /// Reads every file again; replaces all the configurations, or none.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        // Everything is loaded before anything is swapped.
        enum Staged<'a> {
            Server(&'a Swappable<ServerConfig>, Arc<ServerConfig>),
            Client(&'a Swappable<Upstream>, Arc<Upstream>),
        }
        let mut staged = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            staged.push(match slot {
                Slot::Listener { name, tls, current } => Staged::Server(
                    current,
                    crate::listen::tls::server_config(tls).map_err(|source| {
                        ReloadError::Listener {
                            name: name.clone(),
                            source,
                        }
                    })?,
                ),
                Slot::Destination { name, tls, current } => Staged::Client(
                    current,
                    Arc::new(crate::forward::tls::upstream(tls).map_err(|source| {
                        ReloadError::Destination {
                            name: name.clone(),
                            source,
                        }
                    })?),
                ),
            });
        }
        for s in staged {
            match s {
                Staged::Server(current, config) => current.replace(config),
                Staged::Client(current, up) => current.replace(up),
            }
        }
        let mut done = Reloaded::default();
        for slot in &self.slots {
            match slot {
                Slot::Listener { name, .. } => done.listeners.push(name.clone()),
                Slot::Destination { name, .. } => done.destinations.push(name.clone()),
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener_tls(pki: &crate::devpki::DevPki) -> TlsSettings {
        TlsSettings {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
            allowed_clients: Vec::new(),
        }
    }

    #[test]
    fn a_reload_replaces_every_configuration_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let a = crate::devpki::generate(&dir.path().join("a"), "a").unwrap();
        let b = crate::devpki::generate(&dir.path().join("b"), "b").unwrap();
        let slot = |pki| {
            let t = listener_tls(pki);
            (
                Swappable::new(crate::listen::tls::server_config(&t).unwrap()),
                t,
            )
        };
        let (first, first_tls) = slot(&a);
        let (second, second_tls) = slot(&b);
        let mut r = Reloader::default();
        r.listener("first", &first_tls, first.clone());
        r.listener("second", &second_tls, second.clone());

        let before = (first.current(), second.current());
        std::fs::write(&b.server_key, "not a key").unwrap();
        let err = r.reload().unwrap_err().to_string();
        assert!(err.starts_with("listener second: "), "{err}");
        assert!(err.contains(&b.server_key.display().to_string()), "{err}");
        // The first listener's files were fine, and still nothing changed.
        assert!(Arc::ptr_eq(&before.0, &first.current()));
        assert!(Arc::ptr_eq(&before.1, &second.current()));

        std::fs::copy(&a.server_key, &b.server_key).unwrap();
        std::fs::copy(&a.server_cert, &b.server_cert).unwrap();
        let done = r.reload().unwrap();
        assert_eq!(done.listeners, ["first", "second"]);
        assert!(!Arc::ptr_eq(&before.0, &first.current()));
        assert!(!Arc::ptr_eq(&before.1, &second.current()));
    }
}
