//! The configuration file as written: serde structs with secure defaults, each field documented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    Backoff, ClientTls, ConfigError, DestinationKind, DestinationSettings, Environment,
    KeySettings, ListenerKind, ListenerSettings, OnPoison, OnReject, PcrBank, RouteSettings,
    Settings, StoreSettings, TlsSettings, TpmSettings, Unrouted,
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
    /// What intake does with messages no route matches.
    #[serde(default)]
    pub intake: IntakeFile,
    /// Upstream systems, each `[[destination]]`.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<DestinationFile>,
    /// Routes, each `[[route]]`: which messages go to which destinations.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
    /// The local control socket of `hl7edge queue`.
    #[serde(default)]
    pub control: ControlFile,
    /// Prometheus metrics listener (off unless configured).
    #[serde(default)]
    pub metrics: MetricsFile,
    /// The audit trail: retention, checkpoints, journald.
    #[serde(default)]
    pub audit: super::audit::AuditFile,
    /// Alert rules.
    #[serde(default)]
    pub alerts: super::audit::AlertsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeFile {
    /// `accept` (default: AA, message kept and logged as unrouted) or `reject` (AR).
    #[serde(default)]
    pub unrouted: Unrouted,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// Unix socket path; relative to `engine.state_dir`. Default `control.sock`.
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Address of the Prometheus text endpoint, e.g. `127.0.0.1:9575`. Absent: no endpoint.
    pub listen: Option<String>,
    /// Allow a non-loopback metrics address.
    #[serde(default)]
    pub danger_non_loopback: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationFile {
    /// Unique name, used in queues, logs and metrics.
    pub name: String,
    /// `mllps` (MLLP over TLS) or `mllp` (plaintext).
    pub kind: ListenerKindFile,
    /// `host:port` of the upstream.
    pub address: String,
    /// Name the server certificate must carry, and SNI. Default: the host of `address`.
    pub server_name: Option<String>,
    /// CA bundle (PEM) the server certificate must chain to. Absent: the platform's roots.
    pub ca: Option<PathBuf>,
    /// SHA-256 of the server's SubjectPublicKeyInfo, base64 or hex; any one must match.
    #[serde(default)]
    pub pin_sha256: Vec<String>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Interface to connect through (SO_BINDTODEVICE).
    pub interface: Option<String>,
    /// Allow a plaintext `mllp` destination without an interface.
    #[serde(default)]
    pub danger_plaintext: bool,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// First retry delay after an AE, a timeout or a connection failure.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Growth of the delay per failed attempt.
    #[serde(default = "default_retry_multiplier")]
    pub retry_multiplier: f64,
    /// Attempts (sent and answered AE, or unanswered) before a message is poison.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// A message failing longer than this after it was queued is poison. Absent: no limit.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// On AR/CR: `dead_letter` (default) or `retry`.
    #[serde(default)]
    pub on_reject: OnReject,
    /// On a poison message: `dead_letter` (default) or `block` the queue.
    #[serde(default)]
    pub on_poison: OnPoison,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    /// Listener names; empty: every listener.
    #[serde(default)]
    pub sources: Vec<String>,
    /// MSH-9 patterns (`ADT^*`, `ORU^R01`); empty: every type.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// MSH-3 namespace ids (`*` wildcard allowed); empty: any.
    #[serde(default)]
    pub sending_applications: Vec<String>,
    /// MSH-4 namespace ids; empty: any.
    #[serde(default)]
    pub sending_facilities: Vec<String>,
    /// Destination names.
    pub destinations: Vec<String>,
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
    /// Delivered (and unrouted) messages are deleted this long after delivery.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Dead letters are deleted this long after they died.
    #[serde(default = "default_dead_retention", with = "humantime_serde")]
    pub dead_letter_retention: Duration,
    /// Most bytes of stored messages; above it intake answers AE. `"4GiB"`, `"500MB"` or bytes.
    #[serde(default = "default_quota")]
    pub quota: ByteSize,
    /// redb's page cache (`"16MiB"`): memory stays bounded however deep the queues are. 16 MiB
    /// keeps the engine near the brief's 64 MiB; with 32 MiB the bench's figures were no better.
    #[serde(default = "default_cache")]
    pub cache: ByteSize,
}

/// A size in bytes, written as an integer or a string with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a size: bytes as an integer, or a string such as \"500MB\" or \"4GiB\""
)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn bytes(&self) -> Option<u64> {
        match self {
            ByteSize::Bytes(b) => Some(*b),
            ByteSize::Text(t) => parse_size(t),
        }
    }
}

/// `"4GiB"`, `"500 MB"`, `"1024"`: binary units for `Ki/Mi/Gi/Ti`, decimal for `k/M/G/T`.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "k" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            path: default_store_path(),
            dedup_window: default_dedup(),
            max_batch: default_batch(),
            retention: default_retention(),
            dead_letter_retention: default_dead_retention(),
            quota: default_quota(),
            cache: default_cache(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// `tpm` (keys sealed in TPM 2.0 under a PCR policy) or `development` (a key file).
    pub provider: KeyProvider,
    /// Development key file; relative to `engine.state_dir`. Default `keys/development.key`.
    pub key_file: Option<PathBuf>,
    /// Allow software keys with `environment = "production"`.
    #[serde(default)]
    pub danger_software_keys: bool,
    /// TPM: the TCTI, e.g. `device:/dev/tpmrm0` (default) or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: Option<String>,
    /// TPM: the PCRs the keys are sealed to, e.g. `[7]`. Required: no default is guessed.
    pub pcrs: Option<Vec<u32>>,
    /// TPM: the PCR bank, `sha256` (default), `sha384` or `sha1`.
    pub pcr_bank: Option<PcrBank>,
    /// TPM: a persistent storage key (SRK) to seal under, e.g. `0x81000001`; absent: a primary
    /// key derived in the owner hierarchy at each start.
    pub srk_handle: Option<HandleFile>,
}

/// A TPM handle written as an integer (`0x81000001`) or a string (`"0x81000001"`).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a persistent TPM handle: an integer such as 0x81000001, or that as a string"
)]
pub enum HandleFile {
    Int(u32),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyProvider {
    Tpm,
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
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_dead_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_cache() -> ByteSize {
    ByteSize::Bytes(16 << 20)
}
fn default_quota() -> ByteSize {
    ByteSize::Bytes(4 << 30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}
fn default_retry_multiplier() -> f64 {
    2.0
}
fn default_max_attempts() -> u32 {
    10
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
pub(super) struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    pub(super) fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// `[keys]`: the development sealer (refused in production unless `danger_software_keys`), or
/// the TPM sealer with an explicit PCR set.
fn validate_keys(
    k: &KeysFile,
    environment: Environment,
    state_dir: &Path,
    cx: &Ctx<'_>,
) -> Result<KeySettings, ConfigError> {
    match k.provider {
        KeyProvider::Development => {
            for (set, key) in [
                (k.tcti.is_some(), "keys.tcti"),
                (k.pcrs.is_some(), "keys.pcrs"),
                (k.pcr_bank.is_some(), "keys.pcr_bank"),
                (k.srk_handle.is_some(), "keys.srk_handle"),
            ] {
                if set {
                    return Err(cx.err(key, "only for provider = \"tpm\""));
                }
            }
            if environment == Environment::Production && !k.danger_software_keys {
                return Err(cx.err(
                    "keys.danger_software_keys",
                    "development keys are refused with environment = \"production\" \
                     unless danger_software_keys = true",
                ));
            }
            Ok(KeySettings::Development {
                key_file: anchor(
                    state_dir,
                    k.key_file
                        .as_deref()
                        .unwrap_or(Path::new("keys/development.key")),
                ),
            })
        }
        KeyProvider::Tpm => {
            if k.key_file.is_some() {
                return Err(cx.err("keys.key_file", "only for provider = \"development\""));
            }
            if k.danger_software_keys {
                return Err(cx.err(
                    "keys.danger_software_keys",
                    "only for provider = \"development\"",
                ));
            }
            let tcti = k
                .tcti
                .clone()
                .unwrap_or_else(|| "device:/dev/tpmrm0".to_string());
            #[cfg(feature = "tpm")]
            if let Err(e) = tcti.parse::<tss_esapi::tcti_ldr::TctiNameConf>() {
                return Err(cx.err(
                    "keys.tcti",
                    format!("not a TCTI (device:PATH, swtpm:host=H,port=P, ...): {e}"),
                ));
            }
            let Some(list) = &k.pcrs else {
                return Err(cx.err(
                    "keys.pcrs",
                    "required for provider = \"tpm\": the PCRs of the expected boot state, e.g. [7]",
                ));
            };
            if list.is_empty() {
                return Err(cx.err("keys.pcrs", "must name at least one PCR"));
            }
            let mut pcrs: Vec<u8> = Vec::with_capacity(list.len());
            for &p in list {
                if p > 23 {
                    return Err(cx.err("keys.pcrs", format!("PCR {p}: must be 0 to 23")));
                }
                if pcrs.contains(&(p as u8)) {
                    return Err(cx.err("keys.pcrs", format!("PCR {p} is listed twice")));
                }
                pcrs.push(p as u8);
            }
            pcrs.sort_unstable();
            let srk_handle = match &k.srk_handle {
                None => None,
                Some(h) => {
                    let v = match h {
                        HandleFile::Int(v) => Some(*v),
                        HandleFile::Text(t) => {
                            let t = t.trim();
                            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                                None => t.parse().ok(),
                            }
                        }
                    };
                    match v {
                        Some(v) if (0x8100_0000..=0x81FF_FFFF).contains(&v) => Some(v),
                        _ => {
                            return Err(cx.err(
                                "keys.srk_handle",
                                "must be a persistent handle, 0x81000000 to 0x81FFFFFF",
                            ))
                        }
                    }
                }
            };
            if !cfg!(feature = "tpm") {
                return Err(cx.err("keys.provider", super::BUILT_WITHOUT_TPM));
            }
            Ok(KeySettings::Tpm(TpmSettings {
                tcti,
                pcrs,
                bank: k.pcr_bank.unwrap_or(PcrBank::Sha256),
                srk_handle,
            }))
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
        let quota = self.store.quota.bytes().ok_or_else(|| {
            cx.err(
                "store.quota",
                "not a size: write bytes or a number with a unit (\"4GiB\", \"500MB\")",
            )
        })?;
        if quota == 0 {
            return Err(cx.err("store.quota", "must be more than zero"));
        }
        let cache = self
            .store
            .cache
            .bytes()
            .filter(|c| (1 << 20..=1 << 40).contains(c))
            .ok_or_else(|| cx.err("store.cache", "must be a size from 1MiB to 1TiB"))?
            as usize;
        for (k, v) in [
            ("store.retention", self.store.retention),
            (
                "store.dead_letter_retention",
                self.store.dead_letter_retention,
            ),
        ] {
            if v.is_zero() {
                return Err(cx.err(k, "must be more than zero"));
            }
        }
        let store = StoreSettings {
            path: anchor(&state_dir, &self.store.path),
            dedup_window: self.store.dedup_window,
            max_batch: self.store.max_batch,
            retention: self.store.retention,
            dead_letter_retention: self.store.dead_letter_retention,
            quota,
            cache,
        };

        let keys = validate_keys(&self.keys, self.engine.environment, &state_dir, &cx)?;

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
            if !(1..=65_536).contains(&l.max_connections) {
                return Err(cx.err(key("max_connections"), "must be from 1 to 65536"));
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

        let destinations = validate_destinations(&cx, &config_dir, self.destinations)?;
        let routes = validate_routes(&cx, self.routes, &listeners, &destinations)?;
        let metrics = match &self.metrics.listen {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    cx.err("metrics.listen", format!("{a:?} is not an address:port"))
                })?;
                if !addr.ip().is_loopback() && !self.metrics.danger_non_loopback {
                    return Err(cx.err(
                        "metrics.listen",
                        "metrics are served without authentication: use a loopback address \
                         (or set danger_non_loopback = true)",
                    ));
                }
                Some(addr)
            }
        };
        let control_socket = anchor(
            &state_dir,
            self.control
                .socket
                .as_deref()
                .unwrap_or(Path::new("control.sock")),
        );

        let audit = super::audit::validate(&cx, self.audit, self.alerts)?;

        Ok(Settings {
            audit,
            // Set by `Settings::from_toml`, which has the text.
            config_hash: String::new(),
            destinations,
            routes,
            unrouted: self.intake.unrouted,
            control_socket,
            metrics,
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Splits `host:port` (`[v6]:port` for IPv6).
fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// A pin: 32 bytes as 64 hex digits or base64 (an optional `sha256/` prefix as in HPKP).
fn parse_pin(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let t = text.trim().trim_start_matches("sha256/");
    let bytes = if t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(t).ok()?
    } else {
        base64::engine::general_purpose::STANDARD.decode(t).ok()?
    };
    bytes.try_into().ok()
}

fn validate_destinations(
    cx: &Ctx<'_>,
    config_dir: &Path,
    files: Vec<DestinationFile>,
) -> Result<Vec<DestinationSettings>, ConfigError> {
    let mut out: Vec<DestinationSettings> = Vec::with_capacity(files.len());
    for (i, d) in files.into_iter().enumerate() {
        let key = |k: &str| format!("destination[{i}].{k}");
        if !valid_name(&d.name) {
            return Err(cx.err(
                key("name"),
                "must be 1-64 characters: letters, digits, '-' and '_'",
            ));
        }
        if out.iter().any(|o| o.name == d.name) {
            return Err(cx.err(
                key("name"),
                format!("duplicate destination name {:?}", d.name),
            ));
        }
        let (host, port) = split_host_port(&d.address)
            .ok_or_else(|| cx.err(key("address"), format!("{:?} is not host:port", d.address)))?;
        if let Some(ifname) = &d.interface {
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
                return Err(cx.err(key("interface"), "not a valid interface name"));
            }
        }
        for (k, v) in [
            ("connect_timeout", d.connect_timeout),
            ("write_timeout", d.write_timeout),
            ("ack_timeout", d.ack_timeout),
            ("retry_initial", d.retry_initial),
        ] {
            if v.is_zero() {
                return Err(cx.err(key(k), "must be more than zero"));
            }
        }
        // Above a day a "retry" is an outage nobody is told about; also keeps the backoff
        // arithmetic far from Duration's limits.
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (k, v) in [
            ("connect_timeout", d.connect_timeout),
            ("write_timeout", d.write_timeout),
            ("ack_timeout", d.ack_timeout),
            ("retry_initial", d.retry_initial),
            ("retry_max", d.retry_max),
        ] {
            if v > DAY {
                return Err(cx.err(key(k), "must be at most 24h"));
            }
        }
        if d.retry_max < d.retry_initial {
            return Err(cx.err(key("retry_max"), "must be at least retry_initial"));
        }
        if !(1.0..=10.0).contains(&d.retry_multiplier) {
            return Err(cx.err(key("retry_multiplier"), "must be between 1.0 and 10.0"));
        }
        if d.max_attempts == 0 {
            return Err(cx.err(key("max_attempts"), "must be at least 1"));
        }
        let kind = match d.kind {
            ListenerKindFile::Mllp => DestinationKind::Mllp,
            ListenerKindFile::Mllps => DestinationKind::Mllps,
        };
        let tls = match kind {
            DestinationKind::Mllp => {
                for (k, set) in [
                    ("ca", d.ca.is_some()),
                    ("pin_sha256", !d.pin_sha256.is_empty()),
                    ("client_cert", d.client_cert.is_some()),
                    ("client_key", d.client_key.is_some()),
                    ("server_name", d.server_name.is_some()),
                ] {
                    if set {
                        return Err(cx.err(
                            key(k),
                            "a plaintext mllp destination takes no TLS settings; use kind = \"mllps\"",
                        ));
                    }
                }
                if d.interface.is_none() && !d.danger_plaintext {
                    return Err(cx.err(
                        key("kind"),
                        "plaintext MLLP carries PHI in the clear: allowed only to a legacy device \
                         on a named interface (set interface) or with danger_plaintext = true",
                    ));
                }
                None
            }
            DestinationKind::Mllps => {
                let mut pins = Vec::with_capacity(d.pin_sha256.len());
                for (j, p) in d.pin_sha256.iter().enumerate() {
                    pins.push(parse_pin(p).ok_or_else(|| {
                        cx.err(
                            format!("destination[{i}].pin_sha256[{j}]"),
                            "not a SHA-256 digest (64 hex digits or base64 of 32 bytes)",
                        )
                    })?);
                }
                let client = match (d.client_cert, d.client_key) {
                    (Some(c), Some(k)) => Some((anchor(config_dir, &c), anchor(config_dir, &k))),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(cx.err(key("client_key"), "client_cert needs client_key"))
                    }
                    (None, Some(_)) => {
                        return Err(cx.err(key("client_cert"), "client_key needs client_cert"))
                    }
                };
                Some(ClientTls {
                    server_name: d.server_name.unwrap_or_else(|| host.clone()),
                    ca: d.ca.map(|p| anchor(config_dir, &p)),
                    pins,
                    client,
                })
            }
        };
        out.push(DestinationSettings {
            name: d.name,
            kind,
            host,
            port,
            tls,
            interface: d.interface,
            connect_timeout: d.connect_timeout,
            write_timeout: d.write_timeout,
            ack_timeout: d.ack_timeout,
            backoff: Backoff {
                initial: d.retry_initial,
                max: d.retry_max,
                multiplier: d.retry_multiplier,
            },
            max_attempts: d.max_attempts,
            max_age: d.max_age,
            on_reject: d.on_reject,
            on_poison: d.on_poison,
        });
    }
    Ok(out)
}

fn validate_routes(
    cx: &Ctx<'_>,
    files: Vec<RouteFile>,
    listeners: &[ListenerSettings],
    destinations: &[DestinationSettings],
) -> Result<Vec<RouteSettings>, ConfigError> {
    let mut out: Vec<RouteSettings> = Vec::with_capacity(files.len());
    for (i, r) in files.into_iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        if !valid_name(&r.name) {
            return Err(cx.err(
                key("name"),
                "must be 1-64 characters: letters, digits, '-' and '_'",
            ));
        }
        if out.iter().any(|o| o.name == r.name) {
            return Err(cx.err(key("name"), format!("duplicate route name {:?}", r.name)));
        }
        for (j, s) in r.sources.iter().enumerate() {
            if !listeners.iter().any(|l| &l.name == s) {
                return Err(cx.err(
                    format!("route[{i}].sources[{j}]"),
                    format!("no listener is named {s:?}"),
                ));
            }
        }
        for (j, t) in r.message_types.iter().enumerate() {
            if t.is_empty() || t.split('^').count() > 3 {
                return Err(cx.err(
                    format!("route[{i}].message_types[{j}]"),
                    format!("{t:?} is not an MSH-9 pattern like \"ADT^*\" or \"ORU^R01\""),
                ));
            }
        }
        if r.destinations.is_empty() {
            return Err(cx.err(key("destinations"), "name at least one destination"));
        }
        let mut dests = Vec::with_capacity(r.destinations.len());
        for (j, d) in r.destinations.iter().enumerate() {
            match destinations.iter().position(|o| &o.name == d) {
                Some(p) => dests.push(p),
                None => {
                    return Err(cx.err(
                        format!("route[{i}].destinations[{j}]"),
                        format!("no destination is named {d:?}"),
                    ))
                }
            }
        }
        out.push(RouteSettings {
            name: r.name,
            sources: r.sources,
            message_types: r.message_types,
            sending_applications: r.sending_applications,
            sending_facilities: r.sending_facilities,
            destinations: dests,
        });
    }
    Ok(out)
}
