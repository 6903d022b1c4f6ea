//! The configuration file as written: serde structs with secure defaults, each field documented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    ConfigError, Environment, KeySettings, ListenerKind, ListenerSettings, Settings, StoreSettings,
    TlsSettings,
};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Engine-wide settings.
    #[serde(default)]
    pub engine: EngineFile,
    /// The durable store.
    #[serde(default)]
    pub store: StoreFile,
    /// Where keys come from.
    pub keys: KeysFile,
    /// Listeners, each `[[listener]]`.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    /// `production` (default) or `development`.
    #[serde(default = "default_environment")]
    pub environment: Environment,
    /// State folder: the store and development keys.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How long SIGTERM waits for connections to finish pending ACKs.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for EngineFile {
    fn default() -> Self {
        EngineFile {
            environment: default_environment(),
            state_dir: default_state_dir(),
            shutdown_grace: default_grace(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// redb file; relative to `engine.state_dir`.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Duplicate window for MSH-3 + MSH-4 + MSH-10.
    #[serde(default = "default_dedup", with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Most messages in one group commit.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            path: default_store_path(),
            dedup_window: default_dedup(),
            max_batch: default_batch(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// `development` (a key file; the TPM sealer arrives with its own issue).
    pub provider: KeyProvider,
    /// Development key file; relative to `engine.state_dir`. Default `keys/development.key`.
    pub key_file: Option<PathBuf>,
    /// Allow software keys with `environment = "production"`.
    #[serde(default)]
    pub danger_software_keys: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyProvider {
    Development,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name, used in logs, metrics and audit (`integration`, `legacy`, `tunnel`).
    pub name: String,
    /// `mllps` (MLLP over TLS) or `mllp` (plaintext, allow-listed).
    pub kind: ListenerKindFile,
    /// Address and port to bind, e.g. `10.20.0.1:2575`.
    pub address: String,
    /// Interface to bind with SO_BINDTODEVICE (the integration VLAN).
    pub interface: Option<String>,
    /// Concurrent connections; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection idle this long is closed.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest message in bytes; larger gets AR and the connection closed.
    #[serde(default = "default_max_message")]
    pub max_message_size: usize,
    /// Answer with MLLP release 2 commit blocks (0x06/0x15) instead of HL7 accept ACKs.
    #[serde(default)]
    pub mllp_release2: bool,
    /// Source addresses or CIDRs allowed to connect; required for `mllp`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow a `/0` entry in `allow` on a plaintext listener.
    #[serde(default)]
    pub danger_allow_any_source: bool,
    /// TLS settings; required for `mllps`.
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKindFile {
    Mllp,
    Mllps,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// Server certificate chain (PEM); relative to the config file's folder.
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Allowed client identities: `CN=...`, `DNS:...`, `IP:...`, `URI:...`, `EMAIL:...`.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Accept clients without a certificate (never on a clinic box).
    #[serde(default)]
    pub danger_no_client_auth: bool,
}

fn default_environment() -> Environment {
    Environment::Production
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hl7edge")
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_store_path() -> PathBuf {
    PathBuf::from("hl7edge.redb")
}
fn default_dedup() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_batch() -> usize {
    1024
}
fn default_max_connections() -> usize {
    64
}
fn default_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_max_message() -> usize {
    1024 * 1024
}

/// Builds errors that name the file.
struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

fn anchor(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl FileConfig {
    pub(super) fn validate(self, file: &Path) -> Result<Settings, ConfigError> {
        let cx = Ctx { file };
        let config_dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let state_dir = anchor(&config_dir, &self.engine.state_dir);

        if self.store.max_batch == 0 {
            return Err(cx.err("store.max_batch", "must be at least 1"));
        }
        let store = StoreSettings {
            path: anchor(&state_dir, &self.store.path),
            dedup_window: self.store.dedup_window,
            max_batch: self.store.max_batch,
        };

        let keys = match self.keys.provider {
            KeyProvider::Development => {
                if self.engine.environment == Environment::Production
                    && !self.keys.danger_software_keys
                {
                    return Err(cx.err(
                        "keys.danger_software_keys",
                        "development keys are refused with environment = \"production\" \
                         unless danger_software_keys = true",
                    ));
                }
                KeySettings::Development {
                    key_file: anchor(
                        &state_dir,
                        self.keys
                            .key_file
                            .as_deref()
                            .unwrap_or(Path::new("keys/development.key")),
                    ),
                }
            }
        };

        let mut listeners: Vec<ListenerSettings> = Vec::with_capacity(self.listeners.len());
        for (i, l) in self.listeners.into_iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if l.name.is_empty()
                || !l
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(cx.err(
                    key("name"),
                    "must be non-empty: letters, digits, '-' and '_'",
                ));
            }
            if listeners.iter().any(|o| o.name == l.name) {
                return Err(cx.err(key("name"), format!("duplicate listener name {:?}", l.name)));
            }
            let address: SocketAddr = l.address.parse().map_err(|_| {
                cx.err(
                    key("address"),
                    format!("{:?} is not an address:port", l.address),
                )
            })?;
            if let Some(ifname) = &l.interface {
                if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
                    return Err(cx.err(key("interface"), "not a valid interface name"));
                }
            }
            if l.max_connections == 0 {
                return Err(cx.err(key("max_connections"), "must be at least 1"));
            }
            if l.max_message_size == 0 {
                return Err(cx.err(key("max_message_size"), "must be at least 1"));
            }
            if l.idle_timeout.is_zero() {
                return Err(cx.err(key("idle_timeout"), "must be more than zero"));
            }
            let mut allow = Vec::with_capacity(l.allow.len());
            for (j, a) in l.allow.iter().enumerate() {
                let net = a
                    .parse::<IpNet>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        cx.err(
                            format!("listener[{i}].allow[{j}]"),
                            format!("{a:?} is not an address or CIDR"),
                        )
                    })?;
                allow.push(net);
            }
            let kind = match l.kind {
                ListenerKindFile::Mllp => ListenerKind::Mllp,
                ListenerKindFile::Mllps => ListenerKind::Mllps,
            };
            let tls = match (kind, l.tls) {
                (ListenerKind::Mllp, Some(_)) => {
                    return Err(cx.err(
                        key("tls"),
                        "a plaintext mllp listener takes no tls table; use kind = \"mllps\"",
                    ))
                }
                (ListenerKind::Mllp, None) => {
                    if allow.is_empty() {
                        return Err(cx.err(
                            key("allow"),
                            "a plaintext mllp listener needs a source allow-list (addresses or CIDRs)",
                        ));
                    }
                    if allow.iter().any(|n| n.prefix_len() == 0) && !l.danger_allow_any_source {
                        return Err(cx.err(
                            key("allow"),
                            "a /0 entry allows every source to send plaintext PHI; \
                             set danger_allow_any_source = true if that is really meant",
                        ));
                    }
                    None
                }
                (ListenerKind::Mllps, None) => {
                    return Err(cx.err(
                        key("tls"),
                        "an mllps listener needs [listener.tls] with cert and key",
                    ))
                }
                (ListenerKind::Mllps, Some(t)) => {
                    if address.ip().is_unspecified() && l.interface.is_none() {
                        return Err(cx.err(
                            key("interface"),
                            format!(
                                "mllps on the wildcard address {} must name the integration interface \
                                 (or bind that interface's address)",
                                address.ip()
                            ),
                        ));
                    }
                    if t.client_ca.is_none() && !t.danger_no_client_auth {
                        return Err(cx.err(
                            format!("listener[{i}].tls.client_ca"),
                            "client certificates are required: name the CA bundle that signs them \
                             (or set danger_no_client_auth = true)",
                        ));
                    }
                    Some(TlsSettings {
                        cert: anchor(&config_dir, &t.cert),
                        key: anchor(&config_dir, &t.key),
                        client_ca: t.client_ca.map(|p| anchor(&config_dir, &p)),
                        allowed_clients: t.allowed_clients,
                    })
                }
            };
            listeners.push(ListenerSettings {
                name: l.name,
                kind,
                address,
                interface: l.interface,
                max_connections: l.max_connections,
                idle_timeout: l.idle_timeout,
                max_message_size: l.max_message_size,
                mllp_release2: l.mllp_release2,
                allow,
                tls,
            });
        }

        Ok(Settings {
            source: file.to_path_buf(),
            environment: self.engine.environment,
            state_dir,
            store,
            keys,
            listeners,
            shutdown_grace: self.engine.shutdown_grace,
        })
    }
}
