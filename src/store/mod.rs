//! The durable store: a write-ahead log in front of redb, fed by a group-commit writer, and the
//! per-destination queues the forwarders drain.
//!
//! Intake path (promise 1): every accepted message goes to the writer's queue with the
//! destinations its routes picked. A writer round takes every message waiting at that moment (up
//! to `max_batch`), checks duplicates and the quota, seals each body, and appends the whole batch
//! to the write-ahead log ([`wal`]) with one `O_DSYNC` write; each log frame holds the message and
//! its queue entries (promise 2). Only then does it answer the submitters, which send the ACKs.
//! The writer thread runs the rounds, except that a submitter whose message waits alone runs
//! its round itself (`pipeline::Shared`): a lone sender's ACK then waits for the disk only.
//!
//! The applier thread ([`pipeline`]) moves logged records into redb ([`txn`] lists the tables),
//! together with the forwarders' outcomes (delivered, attempted, dead) and operator actions
//! (replay, discard). It commits without fsync as changes arrive and with one every 100 ms; log
//! segments are deleted only up to the last durable commit. [`Store::open`] replays the log into
//! redb before anything else, so after a crash every acknowledged message and its queue entries
//! are in redb. An outcome lost in a crash means the message is sent again: at least once.
//!
//! Invariants:
//! - A submitter hears `Ok` only after the log append holding its message was fsync'd.
//! - A failed append answers every message of the batch with an error (AE), none is stored.
//! - Ids increase in log order and redb holds a prefix of the log, so each destination's queue
//!   in redb only ever grows at its back: a forwarder's cursor never skips an entry.
//! - A duplicate is found in the batch, in the logged-but-not-applied set, or in redb, checked in
//!   that order (an entry leaves the pending set only after the applier committed it).
//! - Message bodies are sealed (`keys::Envelope`, id as associated data) before they reach the
//!   log or redb; the plaintext metadata carries no PHI (promise 3).

mod pipeline;
mod txn;
mod wal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};
use zeroize::Zeroizing;

use crate::config::StoreSettings;
use crate::keys::Envelope;
pub use pipeline::{Affected, ControlOp, Live};
use pipeline::{Applier, Op, Shared, Writer};
use txn::{Counts, Txn, COUNTERS, DEAD, DEDUP, DEDUP_HASHED, DONE, MESSAGES, NEXT_ID, QUEUE, REFS};
pub use txn::{DeadLetter, Selector};
use wal::{Wal, WalRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("cannot create the state folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store write failed: {0}")]
    Write(#[source] Box<redb::Error>),
    #[error("store read failed: {0}")]
    Read(#[source] Box<redb::Error>),
    #[error("cannot encrypt message {id}: {source}")]
    Seal {
        id: u64,
        #[source]
        source: crate::keys::EnvelopeError,
    },
    #[error("write-ahead log {path}: {source}")]
    Wal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store is above its quota of {quota} bytes")]
    Quota { quota: u64 },
    #[error("the store is being reopened after an I/O error")]
    Reopening,
    #[error("the store writer has stopped")]
    WriterGone,
}

pub(crate) fn write_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Write(Box::new(e.into()))
}
pub(crate) fn read_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Read(Box::new(e.into()))
}

/// Metadata kept in plaintext beside each sealed message: header fields that carry no PHI.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub listener: String,
    pub peer: String,
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    pub message_type: String,
    pub control_id: String,
    pub version: String,
    pub size: usize,
    pub received_ms: u64,
    /// Keyed token of the MRN (PID-3), for audit queries by patient; never the MRN itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn_token: Option<String>,
    /// The MRN sealed under the message key (base64), id bound with [`MRN_DOMAIN`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn_sealed: Option<String>,
    /// The acknowledgement sent once the message is stored (`AA`, `CA`, `0x06` for MLLP
    /// release 2, `none` when MSH-15 asks for none), for the audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<String>,
}

/// Or'ed into a message id to seal its MRN: the same key and record id as the body, another
/// associated datum, so neither ciphertext opens as the other. Ids never reach 2^63.
pub const MRN_DOMAIN: u64 = 1 << 63;

/// A message to store.
pub struct Intake {
    pub meta: Meta,
    pub raw: Vec<u8>,
    /// Destinations its routes picked; empty for an unrouted message.
    pub destinations: Vec<String>,
    /// PID-3's MRN, sealed by the writer into `meta.mrn_sealed` (its token is already in
    /// `meta.mrn_token`).
    pub mrn: Option<Zeroizing<String>>,
}

/// The received message is PHI in plaintext: wiped once sealed and dropped.
impl Drop for Intake {
    fn drop(&mut self) {
        crate::wipe::vec(&mut self.raw);
    }
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("control_id", &self.meta.control_id)
            .field("bytes", &self.raw.len())
            .field("destinations", &self.destinations)
            .finish()
    }
}

/// Where a submitted message ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored under this id.
    New(u64),
    /// Already stored under this id within the duplicate window: not stored again.
    Duplicate(u64),
}

pub(crate) enum Job {
    Intake {
        intake: Box<Intake>,
        reply: oneshot::Sender<Result<Stored, Arc<StoreError>>>,
    },
    Control {
        op: ControlOp,
        reply: oneshot::Sender<Result<Affected, StoreError>>,
    },
}

/// Submits messages and operator actions to the writer. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    // Dropped before `writer`: when the last handle goes, the writer thread is woken after the
    // queue's last sender is gone, and so finds it closed.
    tx: mpsc::Sender<Job>,
    writer: Arc<HandlesWriter>,
}

/// The writer as the handles share it: wakes its thread when the last [`StoreHandle`] is
/// dropped, so that it stops.
struct HandlesWriter(Arc<Shared>);

impl Drop for HandlesWriter {
    fn drop(&mut self) {
        self.0.wake();
    }
}

impl StoreHandle {
    /// Stores a message durably; returns once its log append is fsync'd.
    pub async fn submit(&self, intake: Intake) -> Result<Stored, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Intake {
                intake: Box::new(intake),
                reply,
            })
            .await
            .map_err(|_| Arc::new(StoreError::WriterGone))?;
        // Permits return to the channel as jobs are taken, so the permits in use count the
        // jobs waiting (and any a sender is queueing: it then leads or wakes the writer itself).
        self.writer
            .0
            .lead(|| self.tx.max_capacity() - self.tx.capacity());
        rx.await.map_err(|_| Arc::new(StoreError::WriterGone))?
    }

    /// Replays or discards dead letters; returns once the change is durable.
    pub async fn control(&self, op: ControlOp) -> Result<Affected, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Control { op, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        self.writer.0.wake();
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

/// Reports delivery outcomes to the applier. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Outcomes {
    tx: std::sync::mpsc::Sender<Op>,
}

impl Outcomes {
    pub fn delivered(&self, dest: &str, seq: u64) {
        let _ = self.tx.send(Op::Delivered {
            dest: dest.to_string(),
            seq,
        });
    }
    pub fn attempted(&self, dest: &str, seq: u64, attempts: u32) {
        let _ = self.tx.send(Op::Attempted {
            dest: dest.to_string(),
            seq,
            attempts,
        });
    }
    pub fn dead(&self, dest: &str, seq: u64, letter: DeadLetter) {
        let _ = self.tx.send(Op::Dead {
            dest: dest.to_string(),
            seq,
            letter,
        });
    }
}

/// Sends audit events to the applier, which chains them into the `audit` table in its next
/// commit (durable within 100 ms). Cheap to clone; never blocks.
#[derive(Clone)]
pub struct AuditSink {
    tx: std::sync::mpsc::Sender<Op>,
}

impl AuditSink {
    pub fn record(&self, event: crate::audit::Event) {
        let _ = self.tx.send(Op::Audit(Box::new(event)));
    }
}

/// A queue entry with its message, as a forwarder sends it.
pub struct Queued {
    pub seq: u64,
    pub message_id: u64,
    pub queued_ms: u64,
    pub attempts: u32,
    /// MSH-10 as stored, which the destination's MSA-2 must echo.
    pub control_id: String,
    /// The decrypted message, or why it cannot be read.
    pub body: Result<Zeroizing<Vec<u8>>, String>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("seq", &self.seq)
            .field("message_id", &self.message_id)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// A destination's queue figures from redb.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueFigures {
    pub depth: u64,
    pub dead_letters: u64,
    /// When the oldest queued entry was queued.
    pub oldest_queued_ms: Option<u64>,
}

/// A dead letter with its message's metadata, for `queue dead`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadView {
    pub destination: String,
    pub letter: DeadLetter,
    pub meta: Option<Meta>,
}

/// Read access to the store, shared by forwarders, the control socket and offline commands.
#[derive(Clone)]
pub struct StoreReader {
    db: DbSlot,
    envelope: Option<Arc<Envelope>>,
}

impl StoreReader {
    /// Up to `limit` entries of `dest`'s queue after `after_seq`, in order, with their messages.
    pub fn queue_batch(
        &self,
        dest: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let queue = tx.open_table(QUEUE).map_err(read_err)?;
        let messages = tx.open_table(MESSAGES).map_err(read_err)?;
        let mut out = Vec::new();
        let start = after_seq.saturating_add(1);
        for row in queue
            .range((dest, start)..=(dest, u64::MAX))
            .map_err(read_err)?
            .take(limit)
        {
            let (k, v) = row.map_err(read_err)?;
            let (_, seq) = k.value();
            let (message_id, queued_ms, attempts) = v.value();
            let rec = messages.get(message_id).map_err(read_err)?;
            let (control_id, body) = match rec.as_ref().and_then(|r| split_record(r.value())) {
                None => (
                    String::new(),
                    Err("message record missing or unreadable".into()),
                ),
                Some((meta, sealed)) => {
                    let body = match &self.envelope {
                        Some(env) => env
                            .open(message_id, sealed)
                            .map_err(|e| format!("cannot decrypt: {e}")),
                        None => Err("no message key loaded".into()),
                    };
                    (meta.control_id, body)
                }
            };
            out.push(Queued {
                seq,
                message_id,
                queued_ms,
                attempts,
                control_id,
                body,
            });
        }
        Ok(out)
    }

    /// Depth, dead letters and the oldest entry of each destination.
    pub fn figures(&self, dests: &[String]) -> Result<Vec<QueueFigures>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let counts = Counts::load(&tx.open_table(COUNTERS).map_err(read_err)?)?;
        let queue = tx.open_table(QUEUE).map_err(read_err)?;
        let mut out = Vec::with_capacity(dests.len());
        for d in dests {
            let oldest = txn::oldest_queued(&queue, d).map_err(read_err)?;
            out.push(QueueFigures {
                depth: counts.get(&txn::depth_key(d)),
                dead_letters: counts.get(&txn::dead_key(d)),
                oldest_queued_ms: oldest,
            });
        }
        Ok(out)
    }

    /// Bytes of message records stored.
    pub fn live_bytes(&self) -> Result<u64, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let counts = Counts::load(&tx.open_table(COUNTERS).map_err(read_err)?)?;
        Ok(counts.get(txn::LIVE_BYTES))
    }

    /// Dead letters (metadata only), optionally of one destination.
    pub fn dead_letters(&self, dest: Option<&str>) -> Result<Vec<DeadView>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let dead = tx.open_table(DEAD).map_err(read_err)?;
        let messages = tx.open_table(MESSAGES).map_err(read_err)?;
        let mut out = Vec::new();
        for row in dead.iter().map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            let (d, id) = k.value();
            if dest.is_some_and(|want| want != d) {
                continue;
            }
            let Ok(letter) = serde_json::from_slice::<DeadLetter>(v.value()) else {
                continue;
            };
            let meta = messages
                .get(id)
                .map_err(read_err)?
                .and_then(|r| split_record(r.value()).map(|(m, _)| m));
            out.push(DeadView {
                destination: d.to_string(),
                letter,
                meta,
            });
        }
        Ok(out)
    }

    /// Metadata of every stored message, in id order.
    pub fn list(&self) -> Result<Vec<(u64, Meta)>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            if let Some((meta, _)) = split_record(v.value()) {
                out.push((k.value(), meta));
            }
        }
        Ok(out)
    }

    /// Number of stored messages.
    pub fn message_count(&self) -> Result<u64, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        table.len().map_err(read_err)
    }

    /// Up to `limit` audit records after seq `after`, in order: `(seq, stored value)`.
    pub fn audit_page(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(crate::audit::AUDIT).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table
            .range(after.saturating_add(1)..)
            .map_err(read_err)?
            .take(limit)
        {
            let (k, v) = row.map_err(read_err)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` checkpoints with seq from `from`, in order: `(seq, stored JSON)`.
    pub fn audit_checkpoints(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(crate::audit::CHECKPOINTS).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.range(from..).map_err(read_err)?.take(limit) {
            let (k, v) = row.map_err(read_err)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The sealed body of message `id`.
    pub fn sealed_body(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        let row = table.get(id).map_err(read_err)?;
        Ok(row.and_then(|v| split_record(v.value()).map(|(_, body)| body.to_vec())))
    }
}

/// A started store: what the engine's parts use, and the writer thread to join at shutdown.
pub struct Running {
    pub handle: StoreHandle,
    pub reader: StoreReader,
    pub outcomes: Outcomes,
    pub audit: AuditSink,
    /// Alerts fired per rule since start, for the metrics.
    pub alerts_fired: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    pub live: Arc<Live>,
    pub join: std::thread::JoinHandle<()>,
}

/// The open store.
pub struct Store {
    db: Database,
    path: PathBuf,
    wal_dir: PathBuf,
}

impl Store {
    /// Opens (or creates) the store, then replays the write-ahead log into it: after a crash,
    /// every acknowledged message is in redb once this returns.
    pub fn open(settings: &StoreSettings) -> Result<Store, StoreError> {
        let path = settings.path.clone();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.clone(),
            source: Box::new(e),
        };
        let db = open_db(&path, settings.cache).map_err(|e| open_err(e.into()))?;
        let tx = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            tx.open_table(MESSAGES).map_err(|e| open_err(e.into()))?;
            tx.open_table(DEDUP).map_err(|e| open_err(e.into()))?;
            tx.open_table(QUEUE).map_err(|e| open_err(e.into()))?;
            tx.open_table(DEAD).map_err(|e| open_err(e.into()))?;
            tx.open_table(REFS).map_err(|e| open_err(e.into()))?;
            tx.open_table(DONE).map_err(|e| open_err(e.into()))?;
            tx.open_table(COUNTERS).map_err(|e| open_err(e.into()))?;
            tx.open_table(crate::audit::AUDIT)
                .map_err(|e| open_err(e.into()))?;
            tx.open_table(crate::audit::CHECKPOINTS)
                .map_err(|e| open_err(e.into()))?;
            tx.open_table(crate::audit::AUDIT_META)
                .map_err(|e| open_err(e.into()))?;
        }
        // Store format 1 keyed the duplicate index by a hash; rebuild it in sender order.
        let rebuild = tx
            .delete_table(DEDUP_HASHED)
            .map_err(|e| open_err(e.into()))?;
        {
            let mut t = Txn::open(&tx, None)?;
            t.index_dead_letters()?;
            if rebuild {
                let cutoff = now_ms().saturating_sub(settings.dedup_window.as_millis() as u64);
                let made = t.rebuild_dedup(cutoff)?;
                tracing::info!(
                    entries = made,
                    "Rebuilt the duplicate index in sender order."
                );
            }
            t.finish()?;
        }
        tx.commit().map_err(|e| open_err(e.into()))?;
        let wal_dir = dir.join("wal");
        let store = Store { db, path, wal_dir };
        store.recover()?;
        Ok(store)
    }

    /// Applies logged records that redb's last durable commit does not hold, then clears the log.
    fn recover(&self) -> Result<(), StoreError> {
        let wal_err = |source| StoreError::Wal {
            path: self.wal_dir.clone(),
            source,
        };
        let (records, clean) = wal::replay(&self.wal_dir).map_err(wal_err)?;
        let next = self.next_id()?;
        let mut missing: Vec<WalRecord> = records.into_iter().filter(|r| r.id >= next).collect();
        let applied = missing.len();
        if applied > 0 {
            let tx = self.db.begin_write().map_err(write_err)?;
            {
                let mut t = Txn::open(&tx, None)?;
                for r in &missing {
                    t.insert_record(r)?;
                }
                t.finish()?;
            }
            // Their `message.received` records never made it either: they come from the log.
            crate::audit::append(&tx, missing.iter_mut().map(received_event).collect())?;
            tx.commit().map_err(write_err)?;
            tracing::info!(
                messages = applied,
                "Recovered acknowledged messages from the write-ahead log."
            );
        }
        if !clean {
            tracing::warn!(path = %self.wal_dir.display(), "The write-ahead log ended in a torn frame (a crash during a write); that frame was never acknowledged.");
        }
        wal::clear(&self.wal_dir).map_err(wal_err)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether any message was ever stored here (ids are never reused).
    pub fn has_records(&self) -> Result<bool, StoreError> {
        Ok(self.next_id()? > 1)
    }

    /// The first id not yet used by a message or a queue seq.
    fn next_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let counts = Counts::load(&tx.open_table(COUNTERS).map_err(read_err)?)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        let last = table.last().map_err(read_err)?.map(|(k, _)| k.value());
        Ok(counts.get(NEXT_ID).max(last.map_or(1, |l| l + 1)).max(1))
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        Counts::load(&tx.open_table(COUNTERS).map_err(read_err)?)
    }

    /// Read access while the engine is stopped (no message key: bodies stay sealed).
    pub fn reader(self) -> StoreReader {
        StoreReader {
            db: Arc::new(RwLock::new(Some(Arc::new(self.db)))),
            envelope: None,
        }
    }

    /// Appends audit events durably (the engine stopped, or before it starts), with the alerts
    /// their time rules raise.
    pub fn record_events(
        &self,
        events: Vec<crate::audit::Event>,
        alerts: Option<&crate::audit::alerts::AlertSettings>,
    ) -> Result<(), StoreError> {
        self.record_with_config(None, |_| events, alerts)
    }

    /// Like [`Store::record_events`], and in the same transaction stores `config_hash` as the
    /// configuration started with: `events` gets the one before, so a change is recorded
    /// exactly when it is first seen, or not at all.
    pub fn record_with_config(
        &self,
        config_hash: Option<&str>,
        events: impl FnOnce(Option<String>) -> Vec<crate::audit::Event>,
        alerts: Option<&crate::audit::alerts::AlertSettings>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(write_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(write_err)?;
        let old = match config_hash {
            None => None,
            Some(hash) => {
                let mut t = tx.open_table(crate::audit::AUDIT_META).map_err(write_err)?;
                let old = t
                    .insert(crate::audit::CONFIG_HASH, hash.as_bytes())
                    .map_err(write_err)?
                    .map(|v| String::from_utf8_lossy(v.value()).into_owned());
                old
            }
        };
        let mut events = events(old);
        if let Some(a) = alerts {
            let mut alerter = crate::audit::alerts::Alerter::new(a.clone());
            let raised: Vec<_> = events.iter().flat_map(|e| alerter.observe(e)).collect();
            events.extend(raised);
        }
        let (records, _) = crate::audit::append(&tx, events)?;
        tx.commit().map_err(write_err)?;
        for r in &records {
            crate::audit::journal(r);
        }
        Ok(())
    }

    /// Replays or discards dead letters while the engine is stopped.
    pub fn control(&self, op: &ControlOp) -> Result<Affected, StoreError> {
        let first_seq = self.next_id()?;
        let mut tx = self.db.begin_write().map_err(write_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(write_err)?;
        let (what, affected) = {
            let mut t = Txn::open(&tx, None)?;
            let now = now_ms();
            let done = match op {
                ControlOp::Replay(sel) => ("message.replayed", t.replay(sel, first_seq, now)?),
                ControlOp::Discard(sel) => ("message.discarded", t.discard(sel, now)?),
            };
            t.finish()?;
            done
        };
        let events = affected
            .iter()
            .map(|(dest, id)| {
                crate::audit::Event::new(what)
                    .destination(dest.as_str())
                    .message(*id)
                    .outcome("done")
            })
            .collect();
        crate::audit::append(&tx, events)?;
        tx.commit().map_err(write_err)?;
        Ok(affected)
    }

    /// `keys status` (engine stopped): calls `f` with each message's id and sealed body, in id
    /// order, within one read transaction.
    pub fn visit_bodies(&self, mut f: impl FnMut(u64, &[u8])) -> Result<(), StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        for row in table.iter().map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            if let Some((_, body)) = split_record(v.value()) {
                f(k.value(), body);
            }
        }
        Ok(())
    }

    /// `keys rewrap` (engine stopped): calls `f` with each message's id and sealed body, in id
    /// order; a `Some` answer replaces the body (same length: same format, same plaintext).
    /// Commits every 256 messages, durably, so memory stays bounded; every record is valid under
    /// its own key id at all times, so an interrupted pass can simply run again. `f`'s first
    /// error stops the pass (earlier batches stay committed). Returns the bodies replaced.
    pub fn rewrite_bodies<E>(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> Result<Option<Vec<u8>>, E>,
    ) -> Result<Result<u64, E>, StoreError> {
        const BATCH: usize = 256;
        let mut from = 0u64;
        let mut replaced = 0u64;
        loop {
            let mut tx = self.db.begin_write().map_err(write_err)?;
            tx.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            let mut seen = 0usize;
            {
                let mut table = tx.open_table(MESSAGES).map_err(write_err)?;
                let mut batch = Vec::new();
                for row in table.range(from..).map_err(write_err)?.take(BATCH) {
                    let (k, v) = row.map_err(write_err)?;
                    let id = k.value();
                    seen += 1;
                    from = id.saturating_add(1);
                    if let Some((meta, body)) = split_record(v.value()) {
                        match f(id, body) {
                            Ok(Some(new)) => batch.push((id, make_record(&meta, &new))),
                            Ok(None) => {}
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                }
                for (id, rec) in &batch {
                    table.insert(*id, rec.as_slice()).map_err(write_err)?;
                }
                replaced += batch.len() as u64;
            }
            tx.commit().map_err(write_err)?;
            if seen < BATCH {
                return Ok(Ok(replaced));
            }
        }
    }

    /// Rewrites the file without free space, returning it to the filesystem. Engine stopped.
    pub fn compact(mut self) -> Result<(u64, u64), StoreError> {
        let before = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        self.db
            .compact(redb::CompactionMode::default())
            .map_err(write_err)?;
        drop(self.db);
        let after = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok((before, after))
    }

    /// Starts the intake writer and the applier. They stop when every handle and outcome
    /// sender is dropped and what was submitted is durable in redb.
    pub fn start(
        self,
        envelope: Arc<Envelope>,
        settings: &StoreSettings,
        destinations: &[String],
        audit: StartAudit,
    ) -> Result<Running, StoreError> {
        let next_id = self.next_id()?;
        let counts = self.counts()?;
        let last_ckpt = {
            let tx = self.db.begin_read().map_err(read_err)?;
            let cps = tx.open_table(crate::audit::CHECKPOINTS).map_err(read_err)?;
            let last = cps.last().map_err(read_err)?.map_or(0, |(k, _)| k.value());
            last
        };
        let alerts_fired = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let wal = Wal::create(&self.wal_dir, next_id).map_err(|source| StoreError::Wal {
            path: self.wal_dir.clone(),
            source,
        })?;
        let db: DbSlot = Arc::new(RwLock::new(Some(Arc::new(self.db))));
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let durable = Arc::new(AtomicU64::new(next_id - 1));
        let live = Arc::new(Live {
            live_bytes: AtomicU64::new(counts.get(txn::LIVE_BYTES)),
            counts: Mutex::new(counts.clone()),
            wake: destinations
                .iter()
                .map(|d| (d.clone(), Arc::new(Notify::new())))
                .collect(),
        });
        let (apply_tx, apply_rx) = std::sync::mpsc::channel();
        let applier = Applier {
            db: Arc::clone(&db),
            undurable: Applier::new_undurable(),
            path: self.path.clone(),
            cache: settings.cache,
            pending: Arc::clone(&pending),
            durable: Arc::clone(&durable),
            live: Arc::clone(&live),
            counts,
            dedup_window_ms: settings.dedup_window.as_millis() as u64,
            retention_ms: settings.retention.as_millis() as u64,
            dead_retention_ms: settings.dead_letter_retention.as_millis() as u64,
            last_sweep: Instant::now(),
            sweep_behind: false,
            prune_cursor: 0,
            audit: pipeline::AuditState {
                keys: audit.keys,
                alerter: crate::audit::alerts::Alerter::new(audit.settings.alerts.clone()),
                settings: audit.settings,
                last_ckpt,
                last_ckpt_at: Instant::now(),
                dests: destinations.to_vec(),
                quota: settings.quota,
                fired: Arc::clone(&alerts_fired),
            },
            stopping: false,
        };
        let (tx, rx) = mpsc::channel(settings.max_batch.saturating_mul(4).max(64));
        let outcomes = Outcomes {
            tx: apply_tx.clone(),
        };
        let audit_sink = AuditSink {
            tx: apply_tx.clone(),
        };
        let writer = Writer {
            db: Arc::clone(&db),
            wal,
            envelope: Arc::clone(&envelope),
            max_batch: settings.max_batch,
            dedup_window_ms: settings.dedup_window.as_millis() as u64,
            quota: settings.quota,
            next_id,
            pending,
            durable,
            live: Arc::clone(&live),
            apply_tx,
            rx,
            batch: Vec::with_capacity(settings.max_batch),
        };
        let shared = Arc::new(Shared {
            writer: Mutex::new(Some(writer)),
            thread: std::sync::OnceLock::new(),
        });
        let spawn_err = |e| StoreError::Write(Box::new(redb::Error::Io(e)));
        let applier = std::thread::Builder::new()
            .name("store-applier".into())
            .stack_size(crate::THREAD_STACK)
            .spawn(move || applier.run(apply_rx))
            .map_err(spawn_err)?;
        let join = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("store-writer".into())
                .stack_size(crate::THREAD_STACK)
                .spawn(move || shared.run(applier))
                .map_err(spawn_err)?
        };
        // Before any handle exists, so no job is queued while nobody can wake the thread.
        let _ = shared.thread.set(join.thread().clone());
        Ok(Running {
            handle: StoreHandle {
                tx,
                writer: Arc::new(HandlesWriter(shared)),
            },
            reader: StoreReader {
                db,
                envelope: Some(envelope),
            },
            outcomes,
            audit: audit_sink,
            alerts_fired,
            live,
            join,
        })
    }
}

/// What the applier needs for the audit trail.
pub struct StartAudit {
    pub keys: Arc<crate::audit::AuditKeys>,
    pub settings: crate::config::AuditSettings,
}

/// Opens (or creates) the redb file with a bounded page cache (redb's default is 1 GiB).
fn open_db(path: &Path, cache: usize) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new().set_cache_size(cache).create(path)
}

/// Builds a `messages` record: metadata length, metadata, sealed body.
fn make_record(meta: &Meta, sealed: &[u8]) -> Vec<u8> {
    // Serializing plain strings and integers to JSON cannot fail.
    let meta_json = serde_json::to_vec(meta).unwrap_or_default();
    let mut rec = Vec::with_capacity(4 + meta_json.len() + sealed.len());
    rec.extend_from_slice(&(meta_json.len() as u32).to_be_bytes());
    rec.extend_from_slice(&meta_json);
    rec.extend_from_slice(sealed);
    rec
}

/// Splits a `messages` record into metadata and sealed body; `None` when malformed.
pub(super) fn split_record(rec: &[u8]) -> Option<(Meta, &[u8])> {
    let len = u32::from_be_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    let meta = serde_json::from_slice(rec.get(4..end)?).ok()?;
    Some((meta, rec.get(end..)?))
}

/// The `message.received` audit record of a logged message: header metadata, the MRN as its
/// token and sealed, the destinations it was queued for. Derived from the log frame, so it is
/// exactly as durable as the ACK that followed it. Takes the record's parsed metadata (the
/// record itself keeps it), or parses it again when taken already.
pub(crate) fn received_event(r: &mut WalRecord) -> crate::audit::Event {
    let mut e = crate::audit::Event::new("message.received")
        .message(r.id)
        .outcome("stored")
        .with(
            "destinations",
            if r.destinations.is_empty() {
                "unrouted".to_string()
            } else {
                r.destinations.join(",")
            },
        );
    e.time_ms = r.received_ms;
    let meta = match r.meta.take() {
        Some(m) => Some(*m),
        None => split_record(&r.record).map(|(m, _)| m),
    };
    if let Some(m) = meta {
        e = e
            .listener(m.listener)
            .actor(m.peer)
            .control_id(m.control_id)
            .with("sending_application", m.sending_application)
            .with("sending_facility", m.sending_facility)
            .with("receiving_application", m.receiving_application)
            .with("receiving_facility", m.receiving_facility)
            .with("version", m.version)
            .with("size", m.size);
        e.message_type = Some(m.message_type);
        e.mrn_token = m.mrn_token;
        e.mrn_sealed = m.mrn_sealed;
        if let Some(ack) = m.ack {
            e = e.with("ack", ack);
        }
    }
    e
}

impl From<crate::audit::AuditError> for StoreError {
    fn from(e: crate::audit::AuditError) -> StoreError {
        match e {
            crate::audit::AuditError::Store(e) => StoreError::Write(e),
            other => StoreError::Write(Box::new(redb::Error::Corrupted(other.to_string()))),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Longest control id (MSH-10) kept whole in a duplicate-index key; longer ones are hashed.
const DEDUP_ID_MAX: usize = 64;

/// Key of a message in the duplicate index: its sender (16 bytes of SHA-256 over MSH-3 and
/// MSH-4: collisions out of reach), then its control id as a length byte and the id, or 0xFF
/// and 16 bytes of the id's SHA-256 when it is longer than [`DEDUP_ID_MAX`].
///
/// A sender's ids sort together, and counters (the usual MSH-10) sort by value within a length,
/// so a new entry lands beside the sender's previous one. A commit then rewrites a few pages of
/// the index rather than one page per message, as a key that is all hash did: with a day's
/// window the index holds a day of messages, and that cost grew with it.
pub(crate) fn dedup_key(meta: &Meta) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in [&meta.sending_application, &meta.sending_facility] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let mut key = Vec::with_capacity(17 + DEDUP_ID_MAX);
    key.extend_from_slice(&h.finalize()[..16]);
    let id = meta.control_id.as_bytes();
    if id.len() <= DEDUP_ID_MAX {
        key.push(id.len() as u8);
        key.extend_from_slice(id);
    } else {
        key.push(0xFF);
        key.extend_from_slice(&Sha256::digest(id)[..16]);
    }
    key
}

/// The database, shared by the writer (reads), readers and the applier (writes). `None` while
/// the applier reopens it after an I/O error: redb refuses every transaction after one.
type DbSlot = Arc<RwLock<Option<Arc<Database>>>>;

fn db_of(slot: &DbSlot) -> Result<Arc<Database>, StoreError> {
    slot.read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(StoreError::Reopening)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::keys::{load_message_keys, DevSealer};
    use std::time::Duration;

    fn test_audit() -> StartAudit {
        StartAudit {
            keys: Arc::new(crate::audit::AuditKeys::derive(
                &crate::keys::Key::from_bytes([3; 32]),
            )),
            settings: crate::config::AuditSettings {
                retention: Duration::from_secs(3600),
                checkpoint_every: 10,
                checkpoint_interval: Duration::from_secs(60),
                journal_messages: false,
                alerts: Default::default(),
            },
        }
    }

    fn test_settings(dir: &Path, dedup_window: Duration) -> StoreSettings {
        StoreSettings {
            path: dir.join("s.redb"),
            dedup_window,
            max_batch: 16,
            retention: Duration::from_secs(3600),
            dead_letter_retention: Duration::from_secs(3600),
            quota: 1 << 30,
            cache: 1 << 20,
        }
    }

    /// The handle, the reader and the store's thread; the rest is dropped, because every
    /// sender must go for the writer and the applier to stop.
    fn parts(r: Running) -> (StoreHandle, StoreReader, std::thread::JoinHandle<()>) {
        (r.handle, r.reader, r.join)
    }

    fn intake(ctrl: &str) -> Intake {
        Intake {
            meta: meta(ctrl),
            raw: b"MSH|x".to_vec(),
            destinations: vec![],
            mrn: None,
        }
    }

    fn meta(ctrl: &str) -> Meta {
        Meta {
            listener: "t".into(),
            peer: "127.0.0.1:1".into(),
            sending_application: "LAB".into(),
            sending_facility: "CLINIC".into(),
            receiving_application: "EHR".into(),
            receiving_facility: "HOSP".into(),
            message_type: "ADT^A01".into(),
            control_id: ctrl.into(),
            version: "2.5".into(),
            size: 10,
            received_ms: now_ms(),
            mrn_token: None,
            mrn_sealed: None,
            ack: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_are_stored_once_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(dir.path(), Duration::from_secs(3600));
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        let store = Store::open(&settings).unwrap();
        let running = store
            .start(Arc::clone(&env), &settings, &[], test_audit())
            .unwrap();
        // Every sender must go for the writer and the applier to stop.
        let (h, _, join) = parts(running);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.submit(Intake {
                    meta: meta(&format!("C{}", i % 50)),
                    raw: format!("MSH|CANARY{i}").into_bytes(),
                    destinations: vec![],
                    mrn: None,
                })
                .await
                .unwrap()
            }));
        }
        let mut new = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Stored::New(_)) {
                new += 1;
            }
        }
        assert_eq!(new, 50);
        drop(h);
        join.join().unwrap();
        let store = Store::open(&settings).unwrap().reader();
        let list = store.list().unwrap();
        assert_eq!(list.len(), 50);
        let (id, _) = list[0];
        let body = store.sealed_body(id).unwrap().unwrap();
        assert!(env.open(id, &body).unwrap().starts_with(b"MSH|CANARY"));
        drop(store);
        let file = std::fs::read(&settings.path).unwrap();
        assert!(!file.windows(6).any(|w| w == b"CANARY"));
    }

    /// One sender, one message at a time: each round is run by the sender itself (multi-thread
    /// runtime) or by the writer thread (current-thread runtime). Either way every message is
    /// answered once stored, a duplicate is found, and the writer stops when the handle goes.
    async fn lone_sender(dir: &Path) {
        let settings = test_settings(dir, Duration::from_secs(3600));
        let mut sealer = DevSealer::open_or_create(&dir.join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir).unwrap());
        let running = Store::open(&settings)
            .unwrap()
            .start(env, &settings, &[], test_audit())
            .unwrap();
        let (h, _, join) = parts(running);
        let mut ids = Vec::new();
        for i in 0..40 {
            match h.submit(intake(&format!("L{i}"))).await.unwrap() {
                Stored::New(id) => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        let again = h.submit(intake("L7")).await.unwrap();
        assert!(
            matches!(again, Stored::Duplicate(id) if id == ids[7]),
            "{again:?}"
        );
        drop(h);
        tokio::task::spawn_blocking(move || join.join().unwrap())
            .await
            .unwrap();
        let reader = Store::open(&settings).unwrap().reader();
        assert_eq!(reader.list().unwrap().len(), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_sender_runs_its_own_rounds() {
        lone_sender(tempfile::tempdir().unwrap().path()).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_sender_on_a_current_thread_runtime_wakes_the_writer() {
        lone_sender(tempfile::tempdir().unwrap().path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_window_expires() {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(dir.path(), Duration::from_millis(20));
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        let store = Store::open(&settings).unwrap();
        let running = store.start(env, &settings, &[], test_audit()).unwrap();
        let h = running.handle.clone();
        let submit = |ctrl: &str| {
            h.submit(Intake {
                meta: meta(ctrl),
                raw: b"MSH|x".to_vec(),
                destinations: vec![],
                mrn: None,
            })
        };
        assert_eq!(submit("A").await.unwrap(), Stored::New(1));
        assert_eq!(submit("A").await.unwrap(), Stored::Duplicate(1));
        // The window is what is under test: let it pass, then any commit prunes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(submit("B").await.unwrap(), Stored::New(2));
        assert_eq!(submit("A").await.unwrap(), Stored::New(3));
    }

    #[test]
    fn dedup_key_keeps_a_senders_counters_in_order() {
        let key = |app: &str, fac: &str, ctrl: &str| {
            dedup_key(&Meta {
                sending_application: app.into(),
                sending_facility: fac.into(),
                ..meta(ctrl)
            })
        };
        // Counters of one length sort by value, right after each other.
        let ids: Vec<Vec<u8>> = (1000..1100)
            .map(|n| key("LAB", "CLINIC", &format!("N{n}")))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // Another sender's ids never fall between them.
        let other = key("RAD", "CLINIC", "N1050");
        assert!(other < ids[0] || other > ids[99]);
        // The parts cannot slide into each other.
        assert_ne!(key("AB", "C", "1"), key("A", "BC", "1"));
        // Long ids are hashed, still one key per id.
        let long_a = key("LAB", "CLINIC", &"A".repeat(DEDUP_ID_MAX + 1));
        let long_b = key("LAB", "CLINIC", &"B".repeat(DEDUP_ID_MAX + 1));
        assert_ne!(long_a, long_b);
        assert_eq!(long_a.len(), 16 + 1 + 16);
        assert_eq!(long_a[16], 0xFF);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn format_1_duplicate_index_is_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(dir.path(), Duration::from_secs(3600));
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        let running = Store::open(&settings)
            .unwrap()
            .start(Arc::clone(&env), &settings, &[], test_audit())
            .unwrap();
        let (h, _, join) = parts(running);
        assert_eq!(h.submit(intake("A")).await.unwrap(), Stored::New(1));
        assert_eq!(h.submit(intake("B")).await.unwrap(), Stored::New(2));
        drop(h);
        join.join().unwrap();

        // Turn the file into format 1: the index under its old name and key, one entry of it.
        {
            let db = Database::create(&settings.path).unwrap();
            let tx = db.begin_write().unwrap();
            assert!(tx.delete_table(DEDUP).unwrap());
            tx.open_table(DEDUP_HASHED)
                .unwrap()
                .insert([7u8; 16].as_slice(), (1, now_ms()))
                .unwrap();
            tx.commit().unwrap();
        }

        let running = Store::open(&settings)
            .unwrap()
            .start(env, &settings, &[], test_audit())
            .unwrap();
        let (h, _, join) = parts(running);
        assert_eq!(h.submit(intake("A")).await.unwrap(), Stored::Duplicate(1));
        assert_eq!(h.submit(intake("B")).await.unwrap(), Stored::Duplicate(2));
        assert_eq!(h.submit(intake("C")).await.unwrap(), Stored::New(3));
        drop(h);
        join.join().unwrap();
        let db = Database::create(&settings.path).unwrap();
        let tx = db.begin_read().unwrap();
        let names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        assert!(!names.iter().any(|n| n == "dedup"), "{names:?}");
    }

    /// A message only in the log when the engine died is recovered with its duplicate-index
    /// entry, the key derived from the logged record: the sender's retry is a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_recovered_from_the_log_is_a_duplicate_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(dir.path(), Duration::from_secs(3600));
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        // What the writer logs before the ACK, left behind as by kill -9 before any apply.
        {
            let m = meta("LOST-1");
            let record = make_record(&m, &env.seal(1, b"MSH|x").unwrap());
            let mut wal = wal::Wal::create(&dir.path().join("wal"), 1).unwrap();
            wal.append(&[WalRecord {
                id: 1,
                received_ms: m.received_ms,
                dedup_key: dedup_key(&m),
                meta: None,
                destinations: vec![],
                record,
            }])
            .unwrap();
        }
        let running = Store::open(&settings)
            .unwrap()
            .start(env, &settings, &[], test_audit())
            .unwrap();
        let (h, reader, join) = parts(running);
        assert_eq!(reader.list().unwrap().len(), 1);
        drop(reader);
        assert_eq!(
            h.submit(intake("LOST-1")).await.unwrap(),
            Stored::Duplicate(1)
        );
        assert_eq!(h.submit(intake("LOST-2")).await.unwrap(), Stored::New(2));
        drop(h);
        join.join().unwrap();
    }
}
