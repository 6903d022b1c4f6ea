//! Envelope encryption of records at rest with AES-256-GCM.
//!
//! Record format (version 1):
//! `0x01 | key_id u32 BE | salt [16] | counter u64 BE | ciphertext+tag`.
//! Each engine process derives its own subkey `HKDF-SHA256(message key, salt, "hl7edge msg v1")`
//! from a fresh random salt and numbers its records with a counter, so a (subkey, nonce) pair is
//! never reused even across crashes. The record id and key id are bound as associated data: a
//! record copied to another id does not decrypt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{Key, KeyError};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 16 + 8;
const INFO: &[u8] = b"hl7edge msg v1";

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record {id}: too short or unknown format")]
    Format { id: u64 },
    #[error("record {id}: sealed under key {key_id}, which this box does not hold")]
    UnknownKey { id: u64, key_id: u32 },
    #[error("record {id}: authentication failed (modified, moved or wrong key)")]
    Auth { id: u64 },
    #[error("encryption failed")]
    Encrypt,
}

/// Seals and opens records. Shared by the writer and readers.
pub struct Envelope {
    keys: HashMap<u32, Key>,
    current: u32,
    salt: [u8; 16],
    subkey: Aes256Gcm,
    counter: AtomicU64,
    /// Subkeys of other processes' salts, derived on first use.
    cache: Mutex<HashMap<(u32, [u8; 16]), Aes256Gcm>>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("current_key", &self.current)
            .finish_non_exhaustive()
    }
}

fn derive(key: &Key, salt: &[u8; 16]) -> Aes256Gcm {
    let hk = Hkdf::<Sha256>::new(Some(salt), key.bytes());
    let mut sub = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = hk.expand(INFO, sub.as_mut());
    Aes256Gcm::new(sub.as_ref().into())
}

fn aad(id: u64, key_id: u32) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..8].copy_from_slice(&id.to_be_bytes());
    a[8..].copy_from_slice(&key_id.to_be_bytes());
    a
}

impl Envelope {
    /// `keys` holds every key id this box can open; `current` seals new records.
    pub fn new(keys: Vec<(u32, Key)>, current: u32) -> Result<Envelope, KeyError> {
        let keys: HashMap<u32, Key> = keys.into_iter().collect();
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| KeyError::Random(e.to_string()))?;
        let cur = keys
            .get(&current)
            .ok_or(KeyError::Random("current key missing".into()))?;
        let subkey = derive(cur, &salt);
        Ok(Envelope {
            keys,
            current,
            salt,
            subkey,
            counter: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The key id that seals new records.
    pub fn current_key_id(&self) -> u32 {
        self.current
    }

    /// Every key id this envelope can open, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.keys.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The key id a sealed record names (no decryption); `None` when it is not a record.
    pub fn key_id_of(record: &[u8]) -> Option<u32> {
        if record.len() < HEADER + 16 || record.first() != Some(&VERSION) {
            return None;
        }
        Some(u32::from_be_bytes(record.get(1..5)?.try_into().ok()?))
    }

    /// Encrypts `plain` as record `id`.
    pub fn seal(&self, id: u64, plain: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let ct = self
            .subkey
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad(id, self.current),
                },
            )
            .map_err(|_| EnvelopeError::Encrypt)?;
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&self.current.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts record `id`. The plaintext is zeroized when dropped.
    pub fn open(&self, id: u64, record: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if record.len() < HEADER + 16 || record.first() != Some(&VERSION) {
            return Err(EnvelopeError::Format { id });
        }
        let mut kid = [0u8; 4];
        kid.copy_from_slice(&record[1..5]);
        let key_id = u32::from_be_bytes(kid);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&record[5..21]);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&record[21..29]);
        let payload = Payload {
            msg: &record[HEADER..],
            aad: &aad(id, key_id),
        };
        let plain = if key_id == self.current && salt == self.salt {
            self.subkey.decrypt(Nonce::from_slice(&nonce), payload)
        } else {
            let key = self
                .keys
                .get(&key_id)
                .ok_or(EnvelopeError::UnknownKey { id, key_id })?;
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let cipher = cache
                .entry((key_id, salt))
                .or_insert_with(|| derive(key, &salt));
            cipher.decrypt(Nonce::from_slice(&nonce), payload)
        };
        plain
            .map(Zeroizing::new)
            .map_err(|_| EnvelopeError::Auth { id })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key(Zeroizing::new([b; 32]))
    }

    #[test]
    fn records_round_trip_across_processes_and_bind_their_id() {
        let a = Envelope::new(vec![(1, key(9))], 1).unwrap();
        let r1 = a.seal(1, b"PID|||CANARY").unwrap();
        let r2 = a.seal(2, b"PID|||CANARY").unwrap();
        assert_ne!(r1, r2);
        assert!(!r1.windows(6).any(|w| w == b"CANARY"));
        // Another process (other salt) opens both.
        let b = Envelope::new(vec![(1, key(9))], 1).unwrap();
        assert_eq!(&b.open(1, &r1).unwrap()[..], b"PID|||CANARY");
        // Moved to another id, or modified: refused.
        assert!(matches!(b.open(2, &r1), Err(EnvelopeError::Auth { id: 2 })));
        let mut bad = r2.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(b.open(2, &bad), Err(EnvelopeError::Auth { .. })));
        // Unknown key id and garbage.
        let c = Envelope::new(vec![(2, key(9))], 2).unwrap();
        assert!(matches!(
            c.open(1, &r1),
            Err(EnvelopeError::UnknownKey { key_id: 1, .. })
        ));
        assert!(matches!(
            c.open(1, b"xx"),
            Err(EnvelopeError::Format { .. })
        ));
    }
}
