//! Keys: the key hierarchy, its sealers, and envelope encryption of message bodies at rest.
//!
//! The hierarchy: 256-bit keys generated on the box from the OS CSPRNG, each sealed on its own:
//! - `message`: AES-256-GCM of message bodies ([`Envelope`]); rotated by adding a new id, old
//!   ids stay so old records stay readable, new records use the newest;
//! - `audit`: HMAC key of tokens and audit checkpoints (held by the engine for the audit issue);
//! - `disk`: the LUKS2 data partition's passphrase (`keys unseal-disk`);
//! - `tunnel`: the WireGuard private key (X25519), its public key from `keys tunnel-pubkey`.
//!
//! A [`Sealer`] wraps and unwraps them: the TPM 2.0 sealer (module `tpm`, cargo feature `tpm`;
//! PolicyPCR on a configured PCR set) or the development sealer (AES-256-GCM under a key file,
//! refused in production unless `danger_software_keys`, and every start with it logs a warning).
//! On-disk format: `<state_dir>/keys/<name>-<id>.sealed`, one blob per key id (ids from 1),
//! files mode 0600 in a 0700 folder, written atomically. Plaintext keys exist only in memory,
//! zeroized on drop, and never appear in Debug output, logs or errors.
//!
//! Invariants:
//! - No fallback: if a key cannot be unsealed the engine does not start (promise 7), and no
//!   existing key is ever replaced by a new one: a missing key is generated only when no id of
//!   it exists at all.
//! - Key bytes never leave this module except as cipher state, the disk key on a pipe
//!   (`keys unseal-disk`) and the tunnel's public key.

mod envelope;
#[cfg(feature = "tpm")]
pub mod tpm;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

pub use envelope::{Envelope, EnvelopeError};

use crate::config::KeySettings;

/// A 256-bit key; zeroized on drop, redacted in Debug.
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    /// A new key from the OS CSPRNG.
    pub fn generate() -> Result<Key, KeyError> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(k.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Key(k))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(b: [u8; 32]) -> Key {
        Key(Zeroizing::new(b))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(redacted)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {source}")]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} must hold exactly 32 bytes")]
    BadKeyFile { path: PathBuf },
    #[error("the key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyFilePermissions { path: PathBuf, mode: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unseal the {name} key from {path}: the blob is corrupt or sealed under another key file")]
    Unseal { name: &'static str, path: PathBuf },
    #[error("the OS random source failed: {0}")]
    Random(String),
    #[error("cannot open the TPM at {tcti}: {reason}")]
    TpmOpen { tcti: String, reason: String },
    #[error("TPM storage key {parent}: {reason}")]
    TpmStorageKey { parent: String, reason: String },
    #[error("cannot seal the {name} key in the TPM: {reason}")]
    TpmSeal { name: &'static str, reason: String },
    #[error("cannot unseal the {name} key from {path}: the blob is corrupt: {reason}")]
    BlobCorrupt {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot unseal the {name} key from {path}: {reason}")]
    TpmLoad {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot unseal the {name} key from {path}: the TPM refused the PCR policy: {} changed since the key was sealed (the boot state is not the expected one)", pcr_list(bank, changed))]
    PcrMismatch {
        name: &'static str,
        path: PathBuf,
        bank: &'static str,
        changed: Vec<u8>,
    },
    #[error("cannot unseal the {name} key from {path}: the TPM refused the PCR policy ({reason}), though the PCR values recorded at seal time match")]
    PolicyRefused {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot unseal the {name} key from {path}: {reason}")]
    TpmUnseal {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the {name} key does not exist yet: run `hl7edge keys {hint}`")]
    Missing {
        name: &'static str,
        hint: &'static str,
    },
    #[error("the store holds messages sealed under a {name} key, but no {name} key blob is in {dir}: the keys folder was lost or replaced; restore it (a new key would leave every stored message unreadable)")]
    LostForRecords { name: &'static str, dir: PathBuf },
    #[error("cannot read the keys folder {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pcr_list(bank: &str, changed: &[u8]) -> String {
    let list: Vec<String> = changed.iter().map(|p| format!("PCR {p}")).collect();
    format!("{} ({bank})", list.join(", "))
}

impl KeyError {
    /// Whether this error means a key that exists cannot be obtained: TPM absent or refusing,
    /// PCR mismatch, corrupt or foreign blob, wrong key file (exit code 71 at start).
    pub fn is_unseal_failure(&self) -> bool {
        !matches!(
            self,
            KeyError::Write { .. } | KeyError::Random(_) | KeyError::Missing { .. }
        )
    }
}

/// Wraps and unwraps keys.
pub trait Sealer: Send {
    fn describe(&self) -> String;
    /// What a blob is bound to (the TPM sealer: its PCR set), for `keys status`.
    fn blob_policy(&self, _blob: &[u8]) -> Option<String> {
        None
    }
    fn seal(&mut self, name: &'static str, key: &Key) -> Result<Vec<u8>, KeyError>;
    fn unseal(&mut self, name: &'static str, blob: &[u8], path: &Path) -> Result<Key, KeyError>;
}

/// Development sealer: AES-256-GCM under a 32-byte key file.
pub struct DevSealer {
    wrap: Aes256Gcm,
    path: PathBuf,
}

impl DevSealer {
    /// Opens the key file, creating it (mode 0600) when missing.
    pub fn open_or_create(path: &Path) -> Result<DevSealer, KeyError> {
        if !path.exists() {
            let key = Key::generate()?;
            write_private(path, key.bytes())?;
            tracing::warn!(path = %path.display(), "Created a development key file.");
        }
        let meta = fs::metadata(path).map_err(|source| KeyError::ReadKeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::KeyFilePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyError::ReadKeyFile {
            path: path.to_path_buf(),
            source,
        })?);
        let wrap = Aes256Gcm::new_from_slice(&bytes).map_err(|_| KeyError::BadKeyFile {
            path: path.to_path_buf(),
        })?;
        Ok(DevSealer {
            wrap,
            path: path.to_path_buf(),
        })
    }
}

const SEAL_AAD: &str = "hl7edge/dev-seal/v1/";

impl Sealer for DevSealer {
    fn describe(&self) -> String {
        format!("development key file {}", self.path.display())
    }

    fn seal(&mut self, name: &'static str, key: &Key) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| KeyError::Random(e.to_string()))?;
        let aad = format!("{SEAL_AAD}{name}");
        let ct = self
            .wrap
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| KeyError::Random("AES-GCM seal failed".into()))?;
        let mut blob = nonce.to_vec();
        blob.extend(ct);
        Ok(blob)
    }

    fn unseal(&mut self, name: &'static str, blob: &[u8], path: &Path) -> Result<Key, KeyError> {
        let bad = || KeyError::Unseal {
            name,
            path: path.to_path_buf(),
        };
        if blob.len() < 12 {
            return Err(bad());
        }
        let (nonce, ct) = blob.split_at(12);
        let aad = format!("{SEAL_AAD}{name}");
        let pt = Zeroizing::new(
            self.wrap
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| bad())?,
        );
        let mut k = Zeroizing::new([0u8; 32]);
        if pt.len() != 32 {
            return Err(bad());
        }
        k.copy_from_slice(&pt);
        Ok(Key(k))
    }
}

/// Writes a file readable by its owner only, atomically (temp file, fsync, rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    // A new file of our own (O_EXCL, which also refuses a symlink): a leftover temporary file,
    // or one planted with looser permissions, is removed, never written through.
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Opens the sealer the settings name.
pub fn open_sealer(settings: &KeySettings) -> Result<Box<dyn Sealer>, KeyError> {
    match settings {
        KeySettings::Development { key_file } => Ok(Box::new(DevSealer::open_or_create(key_file)?)),
        #[cfg(feature = "tpm")]
        KeySettings::Tpm(t) => Ok(Box::new(tpm::TpmSealer::open(t)?)),
        // The config loader refuses this first; settings built in code end here.
        #[cfg(not(feature = "tpm"))]
        KeySettings::Tpm(t) => Err(KeyError::TpmOpen {
            tcti: t.tcti.clone(),
            reason: crate::config::BUILT_WITHOUT_TPM.into(),
        }),
    }
}

/// The keys of the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Message,
    Audit,
    Disk,
    Tunnel,
}

impl KeyKind {
    pub const ALL: [KeyKind; 4] = [
        KeyKind::Message,
        KeyKind::Audit,
        KeyKind::Disk,
        KeyKind::Tunnel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Message => "message",
            KeyKind::Audit => "audit",
            KeyKind::Disk => "disk",
            KeyKind::Tunnel => "tunnel",
        }
    }

    /// The command that creates this key.
    fn hint(self) -> &'static str {
        match self {
            KeyKind::Disk => "seal-disk",
            _ => "init",
        }
    }
}

/// The folder of sealed blobs.
pub fn keys_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("keys")
}

fn blob_path(state_dir: &Path, kind: KeyKind, id: u32) -> PathBuf {
    keys_dir(state_dir).join(format!("{}-{id}.sealed", kind.name()))
}

/// The sealed ids of `kind`, ascending, with their paths.
pub fn sealed_ids(state_dir: &Path, kind: KeyKind) -> Result<Vec<(u32, PathBuf)>, KeyError> {
    let dir = keys_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(KeyError::ReadDir { path: dir, source }),
    };
    let prefix = format!("{}-", kind.name());
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| KeyError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let file = entry.file_name();
        let Some(id) = file
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".sealed"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((id, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn read_blob(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|source| KeyError::ReadKeyFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Unseals the blob at `path`.
pub fn unseal_file(sealer: &mut dyn Sealer, kind: KeyKind, path: &Path) -> Result<Key, KeyError> {
    let blob = read_blob(path)?;
    sealer.unseal(kind.name(), &blob, path)
}

/// Generates key `id` of `kind`, seals it and writes its blob; refuses to overwrite one.
fn seal_new(
    sealer: &mut dyn Sealer,
    state_dir: &Path,
    kind: KeyKind,
    id: u32,
) -> Result<Key, KeyError> {
    let path = blob_path(state_dir, kind, id);
    if path.exists() {
        return Err(KeyError::Write {
            path,
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    let key = Key::generate()?;
    let blob = sealer.seal(kind.name(), &key)?;
    write_private(&path, &blob)?;
    tracing::info!(key = kind.name(), id, "Generated and sealed a new key.");
    Ok(key)
}

/// Generates and seals `kind` when no id of it exists (idempotent). Returns the newest id and
/// whether it was created now.
pub fn ensure(
    sealer: &mut dyn Sealer,
    state_dir: &Path,
    kind: KeyKind,
) -> Result<(u32, bool), KeyError> {
    match sealed_ids(state_dir, kind)?.last() {
        Some((id, _)) => Ok((*id, false)),
        None => {
            seal_new(sealer, state_dir, kind, 1)?;
            Ok((1, true))
        }
    }
}

/// Unseals the newest id of `kind`; `Missing` when there is none.
pub fn load_current(
    sealer: &mut dyn Sealer,
    state_dir: &Path,
    kind: KeyKind,
) -> Result<(u32, Key), KeyError> {
    let ids = sealed_ids(state_dir, kind)?;
    let Some((id, path)) = ids.last() else {
        return Err(KeyError::Missing {
            name: kind.name(),
            hint: kind.hint(),
        });
    };
    Ok((*id, unseal_file(sealer, kind, path)?))
}

/// Unseals every message key id (generating id 1 on the first start); the newest seals new
/// records.
pub fn load_message_keys(sealer: &mut dyn Sealer, state_dir: &Path) -> Result<Envelope, KeyError> {
    ensure(sealer, state_dir, KeyKind::Message)?;
    open_message_keys(sealer, state_dir)
}

/// Like [`load_message_keys`] for a store that already holds records: a missing key is never
/// generated anew (it would leave them unreadable); the start is refused instead.
pub fn load_message_keys_for_store(
    sealer: &mut dyn Sealer,
    state_dir: &Path,
    store_has_records: bool,
) -> Result<Envelope, KeyError> {
    if store_has_records && sealed_ids(state_dir, KeyKind::Message)?.is_empty() {
        return Err(KeyError::LostForRecords {
            name: KeyKind::Message.name(),
            dir: keys_dir(state_dir),
        });
    }
    load_message_keys(sealer, state_dir)
}

fn open_message_keys(sealer: &mut dyn Sealer, state_dir: &Path) -> Result<Envelope, KeyError> {
    let mut keys = Vec::new();
    for (id, path) in sealed_ids(state_dir, KeyKind::Message)? {
        keys.push((id, unseal_file(sealer, KeyKind::Message, &path)?));
    }
    let current = keys.last().map(|(id, _)| *id).unwrap_or(1);
    Envelope::new(keys, current)
}

/// Adds a new id of `kind` (the newest becomes current). Returns it.
pub fn rotate(sealer: &mut dyn Sealer, state_dir: &Path, kind: KeyKind) -> Result<u32, KeyError> {
    let next = sealed_ids(state_dir, kind)?
        .last()
        .map(|(id, _)| id.saturating_add(1))
        .unwrap_or(1);
    seal_new(sealer, state_dir, kind, next)?;
    Ok(next)
}

/// Unseals every blob and seals it again under the sealer's current policy (the configured PCR
/// set and the current PCR values), replacing each file atomically. Nothing is written unless
/// every key unseals first. Returns the names of the blobs rewritten.
pub fn reseal(sealer: &mut dyn Sealer, state_dir: &Path) -> Result<Vec<String>, KeyError> {
    let mut keys = Vec::new();
    for kind in KeyKind::ALL {
        for (id, path) in sealed_ids(state_dir, kind)? {
            let key = unseal_file(sealer, kind, &path)?;
            keys.push((kind, id, path, key));
        }
    }
    let mut done = Vec::new();
    for (kind, id, path, key) in keys {
        let blob = sealer.seal(kind.name(), &key)?;
        write_private(&path, &blob)?;
        tracing::info!(key = kind.name(), id, "Re-sealed a key.");
        done.push(format!("{}-{id}", kind.name()));
    }
    Ok(done)
}

/// The WireGuard public key (base64) of the tunnel key used as an X25519 private key.
pub fn tunnel_public_key(key: &Key) -> String {
    use base64::Engine as _;
    let secret = x25519_dalek::StaticSecret::from(*key.bytes());
    let public = x25519_dalek::PublicKey::from(&secret);
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

/// The disk key's bytes, for `keys unseal-disk` to write to a pipe.
pub fn disk_key_bytes(key: &Key) -> &[u8; 32] {
    key.bytes()
}

/// One sealed key id as `keys status` shows it (never key bytes).
#[derive(Debug)]
pub struct KeyStatus {
    pub kind: KeyKind,
    pub id: u32,
    pub path: PathBuf,
    /// The sealer's description of what the blob is bound to (PCR set).
    pub policy: Option<String>,
    /// `Ok` when it unseals now.
    pub unseal: Result<(), KeyError>,
}

/// Every sealed id of every key, each tried for unsealing.
pub fn status(sealer: &mut dyn Sealer, state_dir: &Path) -> Result<Vec<KeyStatus>, KeyError> {
    let mut out = Vec::new();
    for kind in KeyKind::ALL {
        for (id, path) in sealed_ids(state_dir, kind)? {
            let blob = read_blob(&path);
            let policy = blob.as_ref().ok().and_then(|b| sealer.blob_policy(b));
            let unseal = blob.and_then(|b| sealer.unseal(kind.name(), &b, &path).map(drop));
            out.push(KeyStatus {
                kind,
                id,
                path,
                policy,
                unseal,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_never_takes_a_leftover_temporary_files_permissions_or_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/k.blob");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension("tmp");
        // A stale temporary file readable by all, then one that is a symlink elsewhere.
        fs::write(&tmp, b"old").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &tmp).unwrap();
        write_private(&path, b"secret2").unwrap();
        assert_eq!(
            fs::read(&elsewhere).unwrap(),
            b"",
            "written through a symlink"
        );
        assert_eq!(fs::read(&path).unwrap(), b"secret2");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn dev_sealer_round_trip_and_wrong_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DevSealer::open_or_create(&dir.path().join("k/dev.key")).unwrap();
        let env = load_message_keys(&mut s, dir.path()).unwrap();
        let rec = env.seal(7, b"MSH|secret").unwrap();
        // Same key file: the same message key comes back.
        let mut s2 = DevSealer::open_or_create(&dir.path().join("k/dev.key")).unwrap();
        let env2 = load_message_keys(&mut s2, dir.path()).unwrap();
        assert_eq!(&env2.open(7, &rec).unwrap()[..], b"MSH|secret");
        // Another key file: a clear error, never a new key.
        let mut s3 = DevSealer::open_or_create(&dir.path().join("other.key")).unwrap();
        let e = load_message_keys(&mut s3, dir.path()).unwrap_err();
        assert!(matches!(
            e,
            KeyError::Unseal {
                name: "message",
                ..
            }
        ));
        assert_eq!(format!("{:?}", Key::generate().unwrap()), "Key(redacted)");
    }

    #[test]
    fn hierarchy_ensure_is_idempotent_and_rotation_adds_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        assert!(matches!(
            load_current(&mut s, dir.path(), KeyKind::Disk),
            Err(KeyError::Missing {
                name: "disk",
                hint: "seal-disk"
            })
        ));
        assert_eq!(
            ensure(&mut s, dir.path(), KeyKind::Disk).unwrap(),
            (1, true)
        );
        let (_, d1) = load_current(&mut s, dir.path(), KeyKind::Disk).unwrap();
        assert_eq!(
            ensure(&mut s, dir.path(), KeyKind::Disk).unwrap(),
            (1, false)
        );
        let (_, d2) = load_current(&mut s, dir.path(), KeyKind::Disk).unwrap();
        assert_eq!(d1.bytes(), d2.bytes());

        let env = load_message_keys(&mut s, dir.path()).unwrap();
        let old = env.seal(1, b"old").unwrap();
        assert_eq!(rotate(&mut s, dir.path(), KeyKind::Message).unwrap(), 2);
        let env = load_message_keys(&mut s, dir.path()).unwrap();
        assert_eq!(env.current_key_id(), 2);
        let new = env.seal(2, b"new").unwrap();
        assert_eq!(Envelope::key_id_of(&old), Some(1));
        assert_eq!(Envelope::key_id_of(&new), Some(2));
        assert_eq!(&env.open(1, &old).unwrap()[..], b"old");
        // A blob copied over another key's file does not unseal as that key.
        fs::copy(
            blob_path(dir.path(), KeyKind::Disk, 1),
            blob_path(dir.path(), KeyKind::Audit, 1),
        )
        .unwrap();
        let st = status(&mut s, dir.path()).unwrap();
        let audit = st.iter().find(|k| k.kind == KeyKind::Audit).unwrap();
        assert!(audit.unseal.is_err());
        assert_eq!(st.iter().filter(|k| k.kind == KeyKind::Message).count(), 2);
    }

    #[test]
    fn tunnel_public_key_is_x25519_of_the_tunnel_key() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(
            &hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap(),
        );
        use base64::Engine as _;
        let pubkey = base64::engine::general_purpose::STANDARD
            .decode(tunnel_public_key(&Key(k)))
            .unwrap();
        assert_eq!(
            hex::encode(pubkey),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.key");
        fs::write(&p, [1u8; 32]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            DevSealer::open_or_create(&p),
            Err(KeyError::KeyFilePermissions { .. })
        ));
    }
}
