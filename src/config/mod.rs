//! Configuration: the TOML file (`/etc/hl7edge/hl7edge.toml`) parsed into file structs, then
//! validated into [`Settings`] before any port is bound ("parse, don't validate").
//!
//! Invariants:
//! - Every file struct denies unknown fields, so a typo is an error, never a silent default.
//! - Every error names the file and the key (`listener[1].address`), and `hl7edge` exits 64 on it.
//! - A configuration that would expose more than promise 4 allows is refused here: an `mllps`
//!   listener on a wildcard address without an interface, a plaintext `mllp` listener without a
//!   source allow-list (or with a `/0` entry), TLS without client authentication unless a
//!   `danger_` knob says so.

mod audit;
mod file;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// Why a build without the `tpm` cargo feature refuses `provider = "tpm"`.
pub const BUILT_WITHOUT_TPM: &str = "this hl7edge was built without TPM support: build it with \
     `cargo build --release --features tpm` (needs libtss2-dev)";

pub use audit::AuditSettings;
pub use file::FileConfig;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/hl7edge/hl7edge.toml";
/// Default MLLP port.
pub const DEFAULT_PORT: u16 = 2575;

/// A configuration error, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// Whether this box runs in production (the default) or for development and demos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Development,
}

/// Validated settings of the whole engine.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these settings came from.
    pub source: PathBuf,
    pub environment: Environment,
    /// Folder of the store and the development key file.
    pub state_dir: PathBuf,
    pub store: StoreSettings,
    pub keys: KeySettings,
    pub listeners: Vec<ListenerSettings>,
    /// How long SIGTERM waits for connections to finish their pending ACKs.
    pub shutdown_grace: Duration,
    pub destinations: Vec<DestinationSettings>,
    pub routes: Vec<RouteSettings>,
    pub unrouted: Unrouted,
    /// Unix socket of `hl7edge queue` (owner-only).
    pub control_socket: PathBuf,
    /// Prometheus text endpoint, when configured.
    pub metrics: Option<SocketAddr>,
    /// The audit trail and alert rules.
    pub audit: AuditSettings,
    /// SHA-256 (hex) of the configuration file's bytes, for the audit of changes.
    pub config_hash: String,
}

/// The answer to a message no route matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unrouted {
    /// AA; the message is kept (until retention) and logged as unrouted.
    #[default]
    Accept,
    /// AR with an ERR saying no route matched; nothing is stored.
    Reject,
}

/// What an AR/CR from a destination does to the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    #[default]
    DeadLetter,
    Retry,
}

/// What a poison message (too many attempts, too old) does to its queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoison {
    /// Move it to dead letters; the queue goes on.
    #[default]
    DeadLetter,
    /// Keep retrying it; nothing behind it moves (order over flow).
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Mllp,
    Mllps,
}

/// Exponential backoff: `initial * multiplier^(n-1)`, at most `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Verified against the server certificate, and sent as SNI.
    pub server_name: String,
    /// CA bundle; `None`: the platform's roots (rustls-platform-verifier).
    pub ca: Option<PathBuf>,
    /// SHA-256 of acceptable SubjectPublicKeyInfos; empty: no pinning.
    pub pins: Vec<[u8; 32]>,
    /// Client certificate chain and key for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct DestinationSettings {
    pub name: String,
    pub kind: DestinationKind,
    pub host: String,
    pub port: u16,
    /// Present exactly for `mllps`.
    pub tls: Option<ClientTls>,
    pub interface: Option<String>,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub ack_timeout: Duration,
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub max_age: Option<Duration>,
    pub on_reject: OnReject,
    pub on_poison: OnPoison,
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub name: String,
    /// Listener names; empty matches every listener.
    pub sources: Vec<String>,
    pub message_types: Vec<String>,
    pub sending_applications: Vec<String>,
    pub sending_facilities: Vec<String>,
    /// Indexes into `Settings::destinations`.
    pub destinations: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The redb file.
    pub path: PathBuf,
    /// A message with the same MSH-3, MSH-4 and MSH-10 within this window is a duplicate.
    pub dedup_window: Duration,
    /// Most messages one group commit takes.
    pub max_batch: usize,
    /// Delivered and unrouted messages are deleted this long after they were done.
    pub retention: Duration,
    /// Dead letters are deleted this long after they died.
    pub dead_letter_retention: Duration,
    /// Most bytes of stored message records; above it intake answers AE.
    pub quota: u64,
    /// redb's page cache in bytes: the store's share of memory, whatever the backlog.
    pub cache: usize,
}

#[derive(Debug, Clone)]
pub enum KeySettings {
    /// Keys wrapped under a key file on disk: for demos and machines without a TPM.
    Development { key_file: PathBuf },
    /// Keys sealed in TPM 2.0 under a PCR policy.
    Tpm(TpmSettings),
}

/// The TPM sealer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmSettings {
    /// TCTI configuration string (`device:/dev/tpmrm0`, `swtpm:host=...,port=...`).
    pub tcti: String,
    /// PCR indexes (sorted, unique, 0..=23) the policy binds.
    pub pcrs: Vec<u8>,
    pub bank: PcrBank,
    /// Persistent storage key to seal under; `None`: a primary derived in the owner hierarchy.
    pub srk_handle: Option<u32>,
}

/// A PCR bank (hash algorithm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PcrBank {
    Sha1,
    Sha256,
    Sha384,
}

impl PcrBank {
    pub fn as_str(self) -> &'static str {
        match self {
            PcrBank::Sha1 => "sha1",
            PcrBank::Sha256 => "sha256",
            PcrBank::Sha384 => "sha384",
        }
    }

    /// Length of one PCR value in this bank.
    pub fn digest_len(self) -> usize {
        match self {
            PcrBank::Sha1 => 20,
            PcrBank::Sha256 => 32,
            PcrBank::Sha384 => 48,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Mllp,
    Mllps,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Mllp => "mllp",
            ListenerKind::Mllps => "mllps",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub name: String,
    pub kind: ListenerKind,
    pub address: SocketAddr,
    /// Bound with SO_BINDTODEVICE when set.
    pub interface: Option<String>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_message_size: usize,
    /// Answer with MLLP release 2 commit blocks instead of HL7 accept ACKs.
    pub mllp_release2: bool,
    /// Sources allowed to connect (plaintext listeners must have one).
    pub allow: Vec<IpNet>,
    pub tls: Option<TlsSettings>,
}

impl ListenerSettings {
    /// Whether `ip` may connect. An empty list allows all (only `mllps` may have one).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to; `None` only with `danger_no_client_auth`.
    pub client_ca: Option<PathBuf>,
    /// Client subjects (`CN=...`) or SANs (`DNS:...`, `IP:...`, `URI:...`, `EMAIL:...`) allowed;
    /// empty allows any certificate that chains to `client_ca`.
    pub allowed_clients: Vec<String>,
}

impl Settings {
    /// Reads and validates the configuration file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and anchors
    /// relative paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        let de = toml::Deserializer::parse(text).map_err(parse_error)?;
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key.is_empty() || key == "." {
                return parse_error(inner);
            }
            let line = inner
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            ConfigError::Invalid {
                file: path.to_path_buf(),
                key,
                message: match line {
                    Some(l) => format!("{} (line {l})", inner.message()),
                    None => inner.message().to_string(),
                },
            }
        })?;
        let mut settings = file.validate(path)?;
        settings.config_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text));
        Ok(settings)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, Path::new("/etc/hl7edge/hl7edge.toml"))
    }

    const KEYS: &str =
        "[engine]\nenvironment = \"development\"\n[keys]\nprovider = \"development\"\n";

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_mllps_listener_is_accepted() {
        let s = load(&format!(
            "{KEYS}[[listener]]\nname = \"integration\"\nkind = \"mllps\"\naddress = \"10.1.0.1:2575\"\n\
             [listener.tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n"
        ))
        .unwrap();
        let l = &s.listeners[0];
        assert_eq!(l.kind, ListenerKind::Mllps);
        assert_eq!(l.max_message_size, 1024 * 1024);
        assert_eq!(
            l.tls.as_ref().unwrap().cert,
            PathBuf::from("/etc/hl7edge/s.pem")
        );
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = err(&format!("{KEYS}[store]\ndedup_windw = \"1h\"\n"));
        assert!(e.contains("/etc/hl7edge/hl7edge.toml"), "{e}");
        assert!(e.contains("store.dedup_windw"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_dotted_key_and_line() {
        let e = err(&format!("{KEYS}[store]\nmax_batch = \"lots\"\n"));
        assert!(
            e.starts_with("/etc/hl7edge/hl7edge.toml: store.max_batch: "),
            "{e}"
        );
        assert!(e.contains("(line 6)"), "{e}");
        let e = err(&format!(
            "{KEYS}[[listener]]\nname = \"a\"\nkind = \"mllp\"\naddress = \"10.0.0.1:2575\"\n\
             allow = [\"10.0.0.2\"]\nmax_connections = \"x\"\n"
        ));
        assert!(e.contains(": listener[0].max_connections: "), "{e}");
    }

    #[test]
    fn mllps_on_wildcard_without_interface_is_refused() {
        let e = err(&format!(
            "{KEYS}[[listener]]\nname = \"i\"\nkind = \"mllps\"\naddress = \"0.0.0.0:2575\"\n\
             [listener.tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n"
        ));
        assert!(e.contains("listener[0].interface"), "{e}");
    }

    #[test]
    fn plaintext_listener_needs_an_allow_list() {
        let base = format!("{KEYS}[[listener]]\nname = \"legacy\"\nkind = \"mllp\"\naddress = \"127.0.0.1:2576\"\n");
        assert!(err(&base).contains("listener[0].allow"));
        assert!(err(&format!("{base}allow = [\"0.0.0.0/0\"]\n")).contains("listener[0].allow"));
        let s = load(&format!(
            "{base}allow = [\"192.168.10.0/24\", \"10.0.0.7\"]\n"
        ))
        .unwrap();
        assert!(s.listeners[0].allows("10.0.0.7".parse().unwrap()));
        assert!(s.listeners[0].allows("::ffff:192.168.10.9".parse().unwrap()));
        assert!(!s.listeners[0].allows("10.0.0.8".parse().unwrap()));
    }

    #[test]
    fn tls_without_client_ca_is_refused_unless_danger() {
        let base = format!(
            "{KEYS}[[listener]]\nname = \"i\"\nkind = \"mllps\"\naddress = \"127.0.0.1:2575\"\n\
             [listener.tls]\ncert = \"s.pem\"\nkey = \"s.key\"\n"
        );
        assert!(err(&base).contains("listener[0].tls.client_ca"));
        load(&format!("{base}danger_no_client_auth = true\n")).unwrap();
    }

    #[test]
    fn six_years_as_an_operator_writes_them_meet_the_default_legal_minimum() {
        // humantime's "6y" is 6 x 365.25 days, half a day under the default retention.
        let s = load(&format!("{KEYS}[audit]\nretention = \"6y\"\n")).unwrap();
        assert_eq!(s.audit.retention, humantime::parse_duration("6y").unwrap());
        assert_eq!(
            load(KEYS).unwrap().audit.retention,
            Duration::from_secs((6 * 365 + 2) * 86_400)
        );
        let e = err(&format!("{KEYS}[audit]\nretention = \"2191days\"\n"));
        assert!(e.contains("audit.retention"), "{e}");
    }

    #[test]
    fn development_keys_in_production_are_refused() {
        let e = err("[keys]\nprovider = \"development\"\n");
        assert!(e.contains("keys.danger_software_keys"), "{e}");
    }

    #[test]
    #[cfg(not(feature = "tpm"))]
    fn tpm_keys_are_refused_by_a_build_without_the_tpm_feature() {
        let e = err("[keys]\nprovider = \"tpm\"\npcrs = [7]\n");
        assert!(e.contains("keys.provider"), "{e}");
        assert!(e.contains("--features tpm"), "{e}");
        assert!(e.contains("/etc/hl7edge/hl7edge.toml"), "{e}");
    }

    #[test]
    #[cfg(feature = "tpm")]
    fn tpm_keys_need_an_explicit_pcr_set_and_valid_values() {
        let e = err("[keys]\nprovider = \"tpm\"\n");
        assert!(e.contains("keys.pcrs"), "{e}");
        assert!(e.contains("/etc/hl7edge/hl7edge.toml"), "{e}");
        let s =
            load("[keys]\nprovider = \"tpm\"\npcrs = [7, 0]\nsrk_handle = 0x81000001\n").unwrap();
        assert_eq!(
            match s.keys {
                KeySettings::Tpm(t) => t,
                other => panic!("{other:?}"),
            },
            TpmSettings {
                tcti: "device:/dev/tpmrm0".into(),
                pcrs: vec![0, 7],
                bank: PcrBank::Sha256,
                srk_handle: Some(0x8100_0001),
            }
        );
        let s = load(
            "[keys]\nprovider = \"tpm\"\npcrs = [7]\npcr_bank = \"sha384\"\n\
             tcti = \"swtpm:host=127.0.0.1,port=2321\"\nsrk_handle = \"0x81000002\"\n",
        )
        .unwrap();
        assert!(matches!(
            s.keys,
            KeySettings::Tpm(TpmSettings {
                bank: PcrBank::Sha384,
                srk_handle: Some(0x8100_0002),
                ..
            })
        ));
        for (text, key) in [
            ("pcrs = []\n", "keys.pcrs"),
            ("pcrs = [24]\n", "keys.pcrs"),
            ("pcrs = [7, 7]\n", "keys.pcrs"),
            ("pcrs = [7]\nsrk_handle = 1\n", "keys.srk_handle"),
            ("pcrs = [7]\ntcti = \"carrier-pigeon:x\"\n", "keys.tcti"),
            ("pcrs = [7]\nkey_file = \"k\"\n", "keys.key_file"),
            ("pcrs = [7]\npcr_bank = \"md5\"\n", "pcr_bank"),
            ("pcrs = [7]\npcr = [1]\n", "pcr"),
        ] {
            let e = err(&format!("[keys]\nprovider = \"tpm\"\n{text}"));
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = err(&format!("{KEYS}pcrs = [7]\n"));
        assert!(e.contains("keys.pcrs"), "{e}");
    }

    #[test]
    fn duplicate_listener_names_and_bad_values_are_refused() {
        let l = "[[listener]]\nname = \"a\"\nkind = \"mllp\"\naddress = \"127.0.0.1:1\"\nallow = [\"127.0.0.1\"]\n";
        assert!(err(&format!("{KEYS}{l}{l}")).contains("listener[1].name"));
        let e = err(&format!(
            "{KEYS}[[listener]]\nname = \"a\"\nkind = \"mllp\"\naddress = \"nowhere\"\n"
        ));
        assert!(e.contains("address"), "{e}");
        let e = err(&format!("{KEYS}{l}max_message_size = 0\n"));
        assert!(e.contains("listener[0].max_message_size"), "{e}");
        // Above tokio's semaphore limit the listener would panic after READY.
        let e = err(&format!("{KEYS}{l}max_connections = 4611686018427387904\n"));
        assert!(e.contains("listener[0].max_connections"), "{e}");
        let e = err(&format!("{KEYS}[store]\ndead_letter_retention = \"0s\"\n"));
        assert!(e.contains("store.dead_letter_retention"), "{e}");
        let d = "[[destination]]\nname = \"h\"\nkind = \"mllp\"\naddress = \"127.0.0.1:1\"\n\
                 danger_plaintext = true\n";
        let e = err(&format!("{KEYS}{d}retry_max = \"1000days\"\n"));
        assert!(e.contains("destination[0].retry_max"), "{e}");
    }
}
