//! Keys: where the message key comes from, and envelope encryption of message bodies at rest.
//!
//! A [`Sealer`] wraps and unwraps 256-bit keys. This module provides the development sealer
//! (keys wrapped under a key file); the TPM 2.0 sealer plugs in behind the same trait.
//! Sealed blobs live in `<state_dir>/keys/<name>-<id>.sealed`; plaintext keys exist only in
//! engine memory, zeroized on drop, and never appear in Debug output, logs or errors.
//!
//! Invariants:
//! - No fallback: if a key cannot be unsealed the engine does not start (promise 7).
//! - Key bytes never leave this module except as cipher state.

mod envelope;

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
}

/// Wraps and unwraps keys.
pub trait Sealer: Send {
    fn describe(&self) -> String;
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
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
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
    }
}

/// Loads the message key (id 1 until rotation exists), generating and sealing it on first start.
pub fn load_message_keys(sealer: &mut dyn Sealer, state_dir: &Path) -> Result<Envelope, KeyError> {
    let path = state_dir.join("keys").join("message-1.sealed");
    let key = if path.exists() {
        let blob = fs::read(&path).map_err(|source| KeyError::ReadKeyFile {
            path: path.clone(),
            source,
        })?;
        sealer.unseal("message", &blob, &path)?
    } else {
        let key = Key::generate()?;
        let blob = sealer.seal("message", &key)?;
        write_private(&path, &blob)?;
        tracing::info!(
            key = "message",
            id = 1,
            "Generated and sealed a new message key."
        );
        key
    };
    Envelope::new(vec![(1, key)], 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
