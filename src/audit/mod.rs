//! The tamper-evident audit trail (promise 5): every message, operator action, configuration
//! change and security event as one record in a hash chain in redb, mirrored to journald.
//!
//! On-disk format (tables in the store's redb file):
//! - `audit`: `u64 seq -> SHA-256 chain hash [32] | canonical record`. The canonical record is
//!   the JSON of [`Record`] (`"v": 1`, its own `seq`, then the event's fields in declaration
//!   order, detail keys sorted), written once and never re-encoded. The chain hash of record `n`
//!   is `SHA-256(hash(n-1) | canonical(n))`; the hash before record 1 is 32 zero bytes.
//! - `audit_checkpoints`: `u64 seq -> JSON Checkpoint`: the chain hash at `seq`, signed with an
//!   Ed25519 key derived from the TPM-sealed audit key. Anyone with the public key
//!   (`hl7edge audit public-key`) can check them without the TPM.
//! - `audit_meta`: `name -> bytes`: the hash of the configuration last started with.
//!
//! Invariants:
//! - Records are only appended, with consecutive seqs, by one writer at a time: the store's
//!   applier while the engine runs, the offline command (which holds redb's file lock) otherwise.
//! - No plaintext PHI: the MRN is kept as a keyed token (HMAC-SHA256 under a key derived from
//!   the audit key, so queries by patient work without decrypting) and sealed with the message
//!   key; other fields are header metadata (applications, facilities, type, control ID).
//! - Retention deletes records only up to a checkpoint, which stays as the anchor: what is left
//!   still verifies from it.
//!
//! Durability: a message's `message.received` record is derived from its write-ahead log frame,
//! so it is as durable as the ACK. Other records are committed with the applier's next durable
//! commit (at most 100 ms later); a crash in that window can lose them, never reorder them.

pub mod alerts;
pub mod cli;
mod verify;

use std::collections::BTreeMap;

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, Verifier as _, VerifyingKey};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use verify::{Problem, Verifier, VerifyReport};

pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_checkpoints");
pub const AUDIT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_meta");
/// `audit_meta` key of the SHA-256 of the configuration file last started with.
pub const CONFIG_HASH: &str = "config_hash";

/// Version of the canonical record encoding.
pub const RECORD_VERSION: u8 = 1;
const CHECKPOINT_DOMAIN: &[u8] = b"hl7edge-audit-checkpoint-v1";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit table: {0}")]
    Store(#[source] Box<redb::Error>),
    #[error("audit record {seq}: unreadable ({reason})")]
    Corrupt { seq: u64, reason: String },
}

pub(crate) fn db_err(e: impl Into<redb::Error>) -> AuditError {
    AuditError::Store(Box::new(e.into()))
}

/// How much an event matters; alerts also go to journald at priority alert or crit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
    Alert,
}

/// One audited event, before it gets its seq. Metadata only: never message content; the MRN
/// only as its token and sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    /// Dotted event type: `message.received`, `forward.delivered`, `auth.failed`, ...
    pub event: String,
    #[serde(default)]
    pub severity: Severity,
    /// Who: TLS subject or peer address, `uid:N` of a local operator, `engine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<u64>,
    /// MSH-10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_id: Option<String>,
    /// MSH-9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// Keyed token of the MRN (PID-3): equal MRNs, equal tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn_token: Option<String>,
    /// The MRN sealed with the message key (base64), for roles allowed to see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn_sealed: Option<String>,
    /// `stored`, `AA`, `AE`, `refused`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Anything else, sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, String>,
}

impl Event {
    /// An event of type `event`, now.
    pub fn new(event: &str) -> Event {
        Event {
            time_ms: crate::store::now_ms(),
            event: event.to_string(),
            ..Event::default()
        }
    }
    pub fn severity(mut self, s: Severity) -> Event {
        self.severity = s;
        self
    }
    pub fn actor(mut self, a: impl Into<String>) -> Event {
        self.actor = Some(a.into());
        self
    }
    pub fn listener(mut self, l: impl Into<String>) -> Event {
        self.listener = Some(l.into());
        self
    }
    pub fn destination(mut self, d: impl Into<String>) -> Event {
        self.destination = Some(d.into());
        self
    }
    pub fn message(mut self, id: u64) -> Event {
        self.message_id = Some(id);
        self
    }
    pub fn control_id(mut self, c: impl Into<String>) -> Event {
        self.control_id = Some(c.into());
        self
    }
    pub fn outcome(mut self, o: impl Into<String>) -> Event {
        self.outcome = Some(o.into());
        self
    }
    pub fn with(mut self, key: &str, value: impl ToString) -> Event {
        self.detail.insert(key.to_string(), value.to_string());
        self
    }
}

/// A stored record: the event with its seq, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Record {
    pub v: u8,
    pub seq: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// By hand, not `#[serde(flatten)]`: the applier encodes a record for every message, and
/// flatten buffers each field through an intermediate value. The output is the same: `v`,
/// `seq`, then the event's fields in declaration order, absent ones skipped.
impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = &self.event;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("v", &self.v)?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("time_ms", &e.time_ms)?;
        m.serialize_entry("event", &e.event)?;
        m.serialize_entry("severity", &e.severity)?;
        macro_rules! opt {
            ($($f:ident),*) => {$(
                if let Some(v) = &e.$f {
                    m.serialize_entry(stringify!($f), v)?;
                }
            )*};
        }
        opt!(
            actor,
            listener,
            destination,
            message_id,
            control_id,
            message_type,
            mrn_token
        );
        opt!(mrn_sealed, outcome);
        if !e.detail.is_empty() {
            m.serialize_entry("detail", &e.detail)?;
        }
        m.end()
    }
}

impl Record {
    /// The canonical bytes that are hashed and stored.
    pub fn canonical(&self) -> Vec<u8> {
        // Strings, integers and a string map: serializing to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `SHA-256(prev | canonical)`.
pub fn chain_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// Splits a stored `audit` value into its chain hash and canonical bytes.
pub fn split_stored(raw: &[u8]) -> Option<([u8; 32], &[u8])> {
    let hash: [u8; 32] = raw.get(..32)?.try_into().ok()?;
    Some((hash, raw.get(32..)?))
}

/// The journald MESSAGE_ID of an event type: 128 bits of SHA-256 of its name, so every event
/// type has a stable id without a registry to keep.
pub fn message_id(event: &str) -> String {
    let d = Sha256::digest(format!("hl7edge.audit.{event}").as_bytes());
    hex::encode(&d[..16])
}

/// A signed chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// Chain hash at `seq`, hex.
    pub hash: String,
    pub time_ms: u64,
    /// Ed25519 public key (base64) that signed it.
    pub key: String,
    /// Ed25519 signature (base64) of `domain | seq | hash | time_ms`.
    pub signature: String,
}

fn checkpoint_message(seq: u64, hash: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

impl Checkpoint {
    /// The chain hash it vouches for, when well formed.
    pub fn hash_bytes(&self) -> Option<[u8; 32]> {
        hex::decode(&self.hash).ok()?.try_into().ok()
    }

    /// Whether `key` signed this checkpoint.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let Some(hash) = self.hash_bytes() else {
            return false;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(&self.signature) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig) else {
            return false;
        };
        key.verify(&checkpoint_message(self.seq, &hash, self.time_ms), &sig)
            .is_ok()
    }
}

/// Parses a base64 Ed25519 public key, as `hl7edge audit public-key` prints it.
pub fn parse_public_key(text: &str) -> Option<VerifyingKey> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    VerifyingKey::from_bytes(&bytes.try_into().ok()?).ok()
}

/// Keys derived from the sealed audit key: MRN tokens and checkpoint signatures.
pub struct AuditKeys {
    token: Zeroizing<[u8; 32]>,
    signing: SigningKey,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeys")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl AuditKeys {
    pub fn derive(audit_key: &crate::keys::Key) -> AuditKeys {
        let hk = Hkdf::<Sha256>::new(None, audit_key.bytes());
        let mut token = Zeroizing::new([0u8; 32]);
        let mut seed = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
        let _ = hk.expand(b"hl7edge mrn token v1", token.as_mut());
        let _ = hk.expand(b"hl7edge audit checkpoint ed25519 v1", seed.as_mut());
        AuditKeys {
            token,
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The MRN's token: `t1:` and 128 bits of HMAC-SHA256, hex. The MRN is trimmed first.
    pub fn token(&self, mrn: &str) -> String {
        // HMAC takes a key of any length: new_from_slice cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(self.token.as_ref()) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(mrn.trim().as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("t1:{}", hex::encode(&tag[..16]))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The checkpoint public key, base64.
    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.verifying_key().as_bytes())
    }

    /// Signs the chain head.
    pub fn checkpoint(&self, seq: u64, hash: &[u8; 32], time_ms: u64) -> Checkpoint {
        let sig = self.signing.sign(&checkpoint_message(seq, hash, time_ms));
        Checkpoint {
            seq,
            hash: hex::encode(hash),
            time_ms,
            key: self.public_key(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        }
    }
}

/// The last record: its seq and chain hash (seq 0 and zeros before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// The chain head in `tx`: the last record, else the anchor checkpoint left by a purge of
/// everything, else the start.
pub fn head(tx: &WriteTransaction) -> Result<Head, AuditError> {
    let table = tx.open_table(AUDIT).map_err(db_err)?;
    if let Some((k, v)) = table.last().map_err(db_err)? {
        let seq = k.value();
        let hash = match split_stored(v.value()) {
            Some((hash, _)) => hash,
            None => {
                // Tampering or damage: `audit verify` reports it at this seq. The chain goes
                // on (from a zero hash) rather than stopping intake and forwarding with it.
                tracing::error!(audit_seq = seq, "The last audit record is unreadable (shorter than its hash); the chain goes on after it. Run `hl7edge audit verify`.");
                [0; 32]
            }
        };
        return Ok(Head { seq, hash });
    }
    let cps = tx.open_table(CHECKPOINTS).map_err(db_err)?;
    if let Some((k, v)) = cps.last().map_err(db_err)? {
        let seq = k.value();
        let cp: Checkpoint =
            serde_json::from_slice(v.value()).map_err(|e| AuditError::Corrupt {
                seq,
                reason: format!("checkpoint: {e}"),
            })?;
        if let Some(hash) = cp.hash_bytes() {
            return Ok(Head { seq, hash });
        }
    }
    Ok(Head::default())
}

/// Appends `events` to the chain in `tx`; returns the records written (to journal after the
/// commit) and the new head.
pub fn append(
    tx: &WriteTransaction,
    events: Vec<Event>,
) -> Result<(Vec<Record>, Head), AuditError> {
    let mut head = head(tx)?;
    if events.is_empty() {
        return Ok((Vec::new(), head));
    }
    let mut table = tx.open_table(AUDIT).map_err(db_err)?;
    let mut out = Vec::with_capacity(events.len());
    let mut value = Vec::new();
    for event in events {
        let record = Record {
            v: RECORD_VERSION,
            seq: head.seq + 1,
            event,
        };
        let canonical = record.canonical();
        let hash = chain_hash(&head.hash, &canonical);
        value.clear();
        value.extend_from_slice(&hash);
        value.extend_from_slice(&canonical);
        table.insert(record.seq, value.as_slice()).map_err(db_err)?;
        head = Head {
            seq: record.seq,
            hash,
        };
        out.push(record);
    }
    Ok((out, head))
}

/// Stores a signed checkpoint of `head`.
pub fn put_checkpoint(
    tx: &WriteTransaction,
    keys: &AuditKeys,
    head: Head,
    time_ms: u64,
) -> Result<Checkpoint, AuditError> {
    let cp = keys.checkpoint(head.seq, &head.hash, time_ms);
    let json = serde_json::to_vec(&cp).unwrap_or_default();
    tx.open_table(CHECKPOINTS)
        .map_err(db_err)?
        .insert(head.seq, json.as_slice())
        .map_err(db_err)?;
    Ok(cp)
}

/// Logs a committed checkpoint: journald keeps a copy outside the store.
pub fn journal_checkpoint(cp: &Checkpoint) {
    tracing::info!(target: "hl7edge::audit", message_id = %message_id("audit.checkpoint"),
        audit_seq = cp.seq, hash = %cp.hash, signature = %cp.signature, "Audit checkpoint signed.");
}

/// The seq of the newest checkpoint (0 when none).
pub fn last_checkpoint(tx: &WriteTransaction) -> Result<u64, AuditError> {
    let cps = tx.open_table(CHECKPOINTS).map_err(db_err)?;
    let last = cps.last().map_err(db_err)?.map_or(0, |(k, _)| k.value());
    Ok(last)
}

/// Retention: deletes records through the newest checkpoint signed before `cutoff_ms`, at
/// most about `max` records, keeping that checkpoint as the anchor of what remains. Returns
/// the records deleted and the anchor's seq.
pub fn purge(
    tx: &WriteTransaction,
    cutoff_ms: u64,
    max: u64,
) -> Result<Option<(u64, u64)>, AuditError> {
    let mut cps = tx.open_table(CHECKPOINTS).map_err(db_err)?;
    let mut records = tx.open_table(AUDIT).map_err(db_err)?;
    let Some(first) = records.first().map_err(db_err)?.map(|(k, _)| k.value()) else {
        return Ok(None);
    };
    // The newest checkpoint older than the cutoff within reach of `max`.
    let mut anchor = None;
    for row in cps.range(first..).map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        let seq = k.value();
        let time = serde_json::from_slice::<Checkpoint>(v.value())
            .map(|c| c.time_ms)
            .unwrap_or(u64::MAX);
        if time >= cutoff_ms || (anchor.is_some() && seq - first >= max) {
            break;
        }
        anchor = Some(seq);
    }
    let Some(anchor) = anchor else {
        return Ok(None);
    };
    let mut deleted = 0u64;
    records
        .retain_in(first..=anchor, |_, _| {
            deleted += 1;
            false
        })
        .map_err(db_err)?;
    cps.retain_in(..anchor, |_, _| false).map_err(db_err)?;
    Ok(Some((deleted, anchor)))
}

/// Logs a committed record to journald (or stderr) with its MESSAGE_ID and fields. Alerts go
/// through the `hl7edge::alert` target, which journald receives at priority alert or crit.
pub fn journal(r: &Record) {
    let e = &r.event;
    let mid = message_id(&e.event);
    let detail = if e.detail.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&e.detail).unwrap_or_default())
    };
    macro_rules! emit {
        ($target:literal, $level:expr, $text:literal) => {
            tracing::event!(target: $target, $level,
                message_id = %mid, audit_seq = r.seq, audit_event = %e.event,
                actor = e.actor.as_deref(), listener = e.listener.as_deref(),
                destination = e.destination.as_deref(), hl7_message_id = e.message_id,
                control_id = e.control_id.as_deref(), message_type = e.message_type.as_deref(),
                mrn_token = e.mrn_token.as_deref(), outcome = e.outcome.as_deref(),
                detail = detail.as_deref(), $text)
        };
    }
    match e.severity {
        Severity::Info => emit!("hl7edge::audit", tracing::Level::INFO, "Audit event."),
        Severity::Warning => emit!("hl7edge::audit", tracing::Level::WARN, "Audit event."),
        Severity::Critical => emit!("hl7edge::alert", tracing::Level::WARN, "Alert."),
        Severity::Alert => emit!("hl7edge::alert", tracing::Level::ERROR, "Alert."),
    }
}

/// Whether records of this event type go to journald when `journal_messages` is off: the
/// per-message flow (received, delivered) stays in the chain only, since at thousands of
/// messages a second journald would rate-limit it away.
pub fn journals_by_default(event: &str) -> bool {
    !matches!(event, "message.received" | "forward.delivered")
}

/// Compact text of a sorted id list: `1-5,7,9-12`.
pub fn id_ranges(ids: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_is_stable_and_versioned() {
        let r = Record {
            v: RECORD_VERSION,
            seq: 7,
            event: Event {
                time_ms: 1,
                event: "message.received".into(),
                listener: Some("integration".into()),
                detail: [("b".to_string(), "2".to_string()), ("a".into(), "1".into())]
                    .into_iter()
                    .collect(),
                ..Event::default()
            },
        };
        let text = String::from_utf8(r.canonical()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"seq":7,"time_ms":1,"event":"message.received","severity":"info","listener":"integration","detail":{"a":"1","b":"2"}}"#
        );
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.canonical(), r.canonical());
        // Field for field what the event's own (derived) encoding says, after `v` and `seq`.
        let mut full = r.clone();
        full.event.actor = Some("uid:0".into());
        full.event.message_id = Some(9);
        full.event.mrn_token = Some("t1:ab".into());
        full.event.outcome = Some("stored".into());
        let derived = serde_json::to_string(&full.event).unwrap();
        let text = String::from_utf8(full.canonical()).unwrap();
        assert_eq!(text, format!("{{\"v\":1,\"seq\":7,{}", &derived[1..]));
    }

    #[test]
    fn tokens_are_keyed_and_checkpoints_verify() {
        let k1 = AuditKeys::derive(&crate::keys::Key::from_bytes([1; 32]));
        let k2 = AuditKeys::derive(&crate::keys::Key::from_bytes([2; 32]));
        assert_eq!(k1.token("MRN123"), k1.token(" MRN123 "));
        assert_ne!(k1.token("MRN123"), k2.token("MRN123"));
        assert!(!k1.token("MRN123").contains("MRN123"));
        let cp = k1.checkpoint(5, &[9; 32], 100);
        assert!(cp.verify(&k1.verifying_key()));
        assert!(!cp.verify(&k2.verifying_key()));
        let mut forged = cp.clone();
        forged.seq = 6;
        assert!(!forged.verify(&k1.verifying_key()));
        assert_eq!(parse_public_key(&k1.public_key()), Some(k1.verifying_key()));
        assert!(!format!("{k1:?}").contains(&hex::encode(k1.token.as_ref())));
    }

    #[test]
    fn id_ranges_are_compact() {
        assert_eq!(id_ranges(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
        assert_eq!(id_ranges(&[]), "");
        assert_eq!(message_id("x").len(), 32);
    }
}
