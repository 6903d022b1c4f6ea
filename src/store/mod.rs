//! The durable store: a write-ahead log in front of redb, fed by a group-commit writer.
//!
//! Intake path (promise 1): every accepted message goes to the writer thread. It takes every
//! message waiting at that moment (up to `max_batch`), checks duplicates, seals each body, and
//! appends the whole batch to the write-ahead log ([`wal`]) with one write and one `fdatasync`.
//! Only then does it answer the submitters, which send the ACKs. One small sequential append per
//! batch costs about one raw fsync, where a redb commit with immediate durability writes several
//! scattered pages; that is why the log exists.
//!
//! The applier thread moves logged records into redb: commits without fsync as records arrive,
//! and one with immediate durability every `DURABLE_EVERY`. Log segments are deleted only up to
//! the last durable redb commit. [`Store::open`] replays the log into redb before anything else,
//! so after a crash every acknowledged message is in redb.
//!
//! On-disk format (redb tables):
//! - `messages`: `u64 id -> record`, record = `meta length u32 BE | JSON metadata | sealed body`.
//!   The metadata (listener, peer, MSH-3/4/5/6/9/10/12, size, time) carries no PHI; the body is
//!   sealed by `keys::Envelope` with the id bound as associated data, so bodies never reach redb
//!   or the log in plaintext (promise 3).
//! - `dedup`: `first 16 bytes of SHA-256(MSH-3, MSH-4, MSH-10) -> (id, received ms)`. Entries
//!   older than the window are pruned by walking `messages` in id order from a cursor.
//!
//! Invariants:
//! - A submitter hears `Ok` only after the log append holding its message was fsync'd.
//! - A failed append answers every message of the batch with an error (AE) and is cut back, so
//!   none of them is counted as stored.
//! - Ids increase in log order; redb holds a prefix of the log after every durable commit.
//! - A duplicate is found in the batch, in the logged-but-not-applied set, or in redb, checked in
//!   that order (an entry leaves the pending set only after the applier committed it).

mod wal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreSettings;
use crate::keys::Envelope;
use wal::{Wal, WalRecord};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const DEDUP: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("dedup");

/// How often the writer prunes expired duplicate-window entries, and how many at most per pass.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
const PRUNE_MAX: usize = 2000;

/// How often the applier makes its redb commits durable (and so lets the log shrink).
const DURABLE_EVERY: Duration = Duration::from_millis(200);
/// Least time between two applier commits.
const APPLY_EVERY: Duration = Duration::from_millis(10);

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
    #[error("the store is being reopened after an I/O error")]
    Reopening,
    #[error("the store writer has stopped")]
    WriterGone,
}

fn write_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Write(Box::new(e.into()))
}
fn read_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Read(Box::new(e.into()))
}

/// Metadata kept in plaintext beside each sealed message: header fields that carry no PHI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
}

/// A message to store.
pub struct Intake {
    pub meta: Meta,
    pub raw: Vec<u8>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("control_id", &self.meta.control_id)
            .field("bytes", &self.raw.len())
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

struct Job {
    intake: Intake,
    reply: oneshot::Sender<Result<Stored, Arc<StoreError>>>,
}

/// Submits messages to the writer. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Job>,
}

impl StoreHandle {
    /// Stores a message durably; returns once its commit is fsync'd.
    pub async fn submit(&self, intake: Intake) -> Result<Stored, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { intake, reply })
            .await
            .map_err(|_| Arc::new(StoreError::WriterGone))?;
        rx.await.map_err(|_| Arc::new(StoreError::WriterGone))?
    }
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
        let db = Database::create(&path).map_err(|e| open_err(e.into()))?;
        let tx = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            tx.open_table(MESSAGES).map_err(|e| open_err(e.into()))?;
            tx.open_table(DEDUP).map_err(|e| open_err(e.into()))?;
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
        let last = self.last_id()?;
        let missing: Vec<WalRecord> = records.into_iter().filter(|r| r.id > last).collect();
        let applied = missing.len();
        write_records(&self.db, &missing, Durability::Immediate, |_, _| Ok(()))?;
        if applied > 0 {
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

    /// Starts the intake writer and the applier. They stop when every handle is dropped and
    /// what was submitted is durable in redb.
    pub fn start_writer(
        self,
        envelope: Arc<Envelope>,
        settings: &StoreSettings,
    ) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StoreError> {
        let next_id = self.last_id()? + 1;
        let wal = Wal::create(&self.wal_dir, next_id).map_err(|source| StoreError::Wal {
            path: self.wal_dir.clone(),
            source,
        })?;
        let db: DbSlot = Arc::new(RwLock::new(Some(Arc::new(self.db))));
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let durable = Arc::new(AtomicU64::new(next_id - 1));
        let (apply_tx, apply_rx) = std::sync::mpsc::channel();
        let applier = Applier {
            db: Arc::clone(&db),
            undurable: Vec::new(),
            path: self.path.clone(),
            pending: Arc::clone(&pending),
            durable: Arc::clone(&durable),
            dedup_window_ms: settings.dedup_window.as_millis() as u64,
            last_prune: Instant::now(),
            prune_cursor: 0,
        };
        let (tx, rx) = mpsc::channel(settings.max_batch.saturating_mul(4).max(64));
        let writer = Writer {
            db,
            wal,
            envelope,
            max_batch: settings.max_batch,
            dedup_window_ms: settings.dedup_window.as_millis() as u64,
            next_id,
            pending,
            durable,
            apply_tx,
        };
        let spawn_err = |e| StoreError::Write(Box::new(redb::Error::Io(e)));
        let applier = std::thread::Builder::new()
            .name("store-applier".into())
            .spawn(move || applier.run(apply_rx))
            .map_err(spawn_err)?;
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx, applier))
            .map_err(spawn_err)?;
        Ok((StoreHandle { tx }, handle))
    }

    fn last_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        let last = table.last().map_err(read_err)?.map(|(k, _)| k.value());
        Ok(last.unwrap_or(0))
    }

    /// Metadata of every stored message, in id order.
    pub fn list(&self) -> Result<Vec<(u64, Meta)>, StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
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

    /// The sealed body of message `id`.
    pub fn sealed_body(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(MESSAGES).map_err(read_err)?;
        let row = table.get(id).map_err(read_err)?;
        Ok(row.and_then(|v| split_record(v.value()).map(|(_, body)| body.to_vec())))
    }
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
fn split_record(rec: &[u8]) -> Option<(Meta, &[u8])> {
    let len = u32::from_be_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    let meta = serde_json::from_slice(rec.get(4..end)?).ok()?;
    Some((meta, rec.get(end..)?))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 16 bytes of SHA-256: collisions are out of reach, and short keys keep the table's pages full.
fn dedup_key(meta: &Meta) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in [
        &meta.sending_application,
        &meta.sending_facility,
        &meta.control_id,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The database, shared by the writer (reads) and the applier (writes). `None` while the applier
/// reopens it after an I/O error: redb refuses every transaction after one (`PreviousIo`).
type DbSlot = Arc<RwLock<Option<Arc<Database>>>>;

fn db_of(slot: &DbSlot) -> Result<Arc<Database>, StoreError> {
    slot.read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(StoreError::Reopening)
}

/// Inserts logged records into redb in one transaction; `also` runs inside it.
fn write_records(
    db: &Database,
    records: &[WalRecord],
    durability: Durability,
    also: impl FnOnce(
        &redb::Table<u64, &[u8]>,
        &mut redb::Table<&[u8], (u64, u64)>,
    ) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(write_err)?;
    tx.set_durability(durability).map_err(write_err)?;
    {
        let mut messages = tx.open_table(MESSAGES).map_err(write_err)?;
        let mut dedup = tx.open_table(DEDUP).map_err(write_err)?;
        for r in records {
            messages
                .insert(r.id, r.record.as_slice())
                .map_err(write_err)?;
            dedup
                .insert(r.dedup_key.as_slice(), (r.id, r.received_ms))
                .map_err(write_err)?;
        }
        also(&messages, &mut dedup)?;
    }
    tx.commit().map_err(write_err)
}

/// Dedup keys of messages in the log but not yet applied to redb.
type Pending = Arc<Mutex<HashMap<[u8; 16], (u64, u64)>>>;

/// Stage 1: makes batches durable in the write-ahead log, then answers their senders.
struct Writer {
    /// Read-only use: duplicate checks.
    db: DbSlot,
    wal: Wal,
    envelope: Arc<Envelope>,
    max_batch: usize,
    dedup_window_ms: u64,
    next_id: u64,
    pending: Pending,
    durable: Arc<AtomicU64>,
    apply_tx: std::sync::mpsc::Sender<Vec<WalRecord>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>, applier: std::thread::JoinHandle<()>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            match self.log(&batch) {
                Ok(results) => {
                    for (job, stored) in batch.drain(..).zip(results) {
                        let _ = job.reply.send(Ok(stored));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(), "Store write failed; senders get AE.");
                    let e = Arc::new(e);
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
            self.wal.release(self.durable.load(Ordering::Acquire));
        }
        // Every handle is gone: let the applier make everything durable in redb, then drop the log.
        drop(self.apply_tx);
        let _ = applier.join();
        self.wal.close(self.durable.load(Ordering::Acquire));
    }

    /// Checks duplicates, seals, appends the batch to the log with one fsync, hands it to the
    /// applier. On error nothing of the batch is stored or counted.
    fn log(&mut self, batch: &[Job]) -> Result<Vec<Stored>, StoreError> {
        let mut results = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut batch_keys: HashMap<[u8; 16], (u64, u64)> = HashMap::new();
        // An entry older than the window is no duplicate, whether or not it was pruned yet.
        let cutoff = now_ms().saturating_sub(self.dedup_window_ms);
        // Pending first, then redb: an entry leaves `pending` only after the applier committed
        // it, so a read transaction begun after the pending check sees it.
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let dedup = tx.open_table(DEDUP).map_err(read_err)?;
        let mut next = self.next_id;
        for job in batch {
            let meta = &job.intake.meta;
            let dkey = dedup_key(meta);
            let existing = match batch_keys.get(&dkey).or_else(|| pending.get(&dkey)) {
                Some(entry) => Some(*entry),
                None => dedup
                    .get(dkey.as_slice())
                    .map_err(read_err)?
                    .map(|v| v.value()),
            };
            if let Some((id, _)) = existing.filter(|(_, ms)| *ms >= cutoff) {
                results.push(Stored::Duplicate(id));
                continue;
            }
            let id = next;
            next += 1;
            let sealed = self
                .envelope
                .seal(id, &job.intake.raw)
                .map_err(|source| StoreError::Seal { id, source })?;
            batch_keys.insert(dkey, (id, meta.received_ms));
            records.push(WalRecord {
                id,
                received_ms: meta.received_ms,
                dedup_key: dkey,
                record: make_record(meta, &sealed),
            });
            results.push(Stored::New(id));
        }
        drop(dedup);
        drop(tx);
        drop(db);
        self.wal
            .append(&records)
            .map_err(|source| StoreError::Wal {
                path: self.wal.dir().to_path_buf(),
                source,
            })?;
        self.next_id = next;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch_keys);
        if !records.is_empty() && self.apply_tx.send(records).is_err() {
            tracing::error!(
                "The store applier stopped; logged messages are applied at the next start."
            );
        }
        Ok(results)
    }
}

/// Stage 2: moves logged records into redb. Commits without fsync, and with one every
/// `DURABLE_EVERY`; the log segments are released only up to the last durable commit.
struct Applier {
    db: DbSlot,
    /// Records committed to redb without fsync since the last durable commit.
    undurable: Vec<WalRecord>,
    path: PathBuf,
    pending: Pending,
    durable: Arc<AtomicU64>,
    dedup_window_ms: u64,
    last_prune: Instant,
    /// Messages below this id have had their duplicate-window entry pruned.
    prune_cursor: u64,
}

impl Applier {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Vec<WalRecord>>) {
        let mut last_durable = Instant::now();
        let mut applied_max = self.durable.load(Ordering::Acquire);
        let mut dirty = false;
        let mut backlog: Vec<WalRecord> = Vec::new();
        let mut failures = 0u64;
        let mut stopping = false;
        let mut last_apply = Instant::now();
        loop {
            let wait = if dirty {
                DURABLE_EVERY.saturating_sub(last_durable.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            match rx.recv_timeout(wait) {
                Ok(records) => backlog.extend(records),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    stopping = true;
                    if backlog.is_empty() {
                        if dirty && self.commit(&[], true).is_ok() {
                            self.durable.store(applied_max, Ordering::Release);
                        }
                        return;
                    }
                }
            }
            // Fewer, larger redb commits cost less CPU than one per logged batch; the log already
            // made these records durable, so waiting here delays nothing a sender sees.
            if !stopping {
                std::thread::sleep(APPLY_EVERY.saturating_sub(last_apply.elapsed()));
            }
            while let Ok(more) = rx.try_recv() {
                backlog.extend(more);
            }
            last_apply = Instant::now();
            let durable = stopping || last_durable.elapsed() >= DURABLE_EVERY;
            match self.commit(&backlog, durable) {
                Ok(()) => {
                    failures = 0;
                    if let Some(max) = backlog.iter().map(|r| r.id).max() {
                        applied_max = applied_max.max(max);
                    }
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    for r in &backlog {
                        if pending.get(&r.dedup_key).is_some_and(|(id, _)| *id == r.id) {
                            pending.remove(&r.dedup_key);
                        }
                    }
                    drop(pending);
                    // Kept until a durable commit: a reopen after an I/O error rolls redb back
                    // to its last durable commit, and these must then be applied again.
                    self.undurable.append(&mut backlog);
                    if durable {
                        self.undurable.clear();
                        self.durable.store(applied_max, Ordering::Release);
                        last_durable = Instant::now();
                        dirty = false;
                    } else {
                        dirty = true;
                    }
                }
                Err(e) => {
                    // The records stay in the log and in the backlog; reopen and try again.
                    tracing::error!(error = %e, messages = backlog.len(), path = %self.path.display(),
                        "Applying logged messages to the store failed; retrying.");
                    failures += 1;
                    if stopping && failures >= 3 {
                        tracing::error!(messages = backlog.len(), "Stopping with logged messages not yet in the store; they are applied at the next start.");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200 * failures.min(25)));
                    self.reopen();
                }
            }
        }
    }

    /// Closes and reopens the database after a failed commit. Returns once reopened or failed.
    fn reopen(&mut self) {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mut db) = slot.take() {
            // Readers hold a clone only for the span of one read transaction.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(db) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        db = still_shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *slot = Some(still_shared);
                        return;
                    }
                }
            }
        }
        // Reopening rolls redb back to its last durable commit: apply again what was committed
        // since, durably, before anyone can read the database.
        let reopened = Database::create(&self.path)
            .map_err(|e| StoreError::Open {
                path: self.path.clone(),
                source: Box::new(e.into()),
            })
            .and_then(|db| {
                write_records(&db, &self.undurable, Durability::Immediate, |_, _| Ok(()))?;
                Ok(db)
            });
        match reopened {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), reapplied = self.undurable.len(), "Store reopened after an I/O error.");
                self.undurable.clear();
                *slot = Some(Arc::new(db));
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "Store cannot be reopened.");
            }
        }
    }

    fn commit(&mut self, records: &[WalRecord], durable: bool) -> Result<(), StoreError> {
        let db = db_of(&self.db)?;
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        let prune = self.last_prune.elapsed()
            >= PRUNE_EVERY.min(Duration::from_millis(self.dedup_window_ms));
        if prune {
            self.last_prune = Instant::now();
        }
        write_records(&db, records, durability, |messages, dedup| {
            if prune {
                self.prune_dedup(messages, dedup)
            } else {
                Ok(())
            }
        })
    }

    /// Removes duplicate-window entries of messages received before the window, walking
    /// `messages` in id order from where the last pass stopped (ids grow with time).
    fn prune_dedup(
        &mut self,
        messages: &redb::Table<u64, &[u8]>,
        dedup: &mut redb::Table<&[u8], (u64, u64)>,
    ) -> Result<(), StoreError> {
        let cutoff = now_ms().saturating_sub(self.dedup_window_ms);
        let mut expired = Vec::new();
        for row in messages
            .range(self.prune_cursor..)
            .map_err(write_err)?
            .take(PRUNE_MAX)
        {
            let (k, v) = row.map_err(write_err)?;
            match split_record(v.value()) {
                Some((meta, _)) if meta.received_ms >= cutoff => break,
                Some((meta, _)) => expired.push((k.value(), dedup_key(&meta))),
                None => expired.push((k.value(), [0u8; 16])),
            }
        }
        for (id, dkey) in expired {
            self.prune_cursor = id + 1;
            let owned = dedup
                .get(dkey.as_slice())
                .map_err(write_err)?
                .is_some_and(|v| v.value().0 == id);
            if owned {
                dedup.remove(dkey.as_slice()).map_err(write_err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::keys::{load_message_keys, DevSealer};

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
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_are_stored_once_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings {
            path: dir.path().join("s.redb"),
            dedup_window: Duration::from_secs(3600),
            max_batch: 16,
        };
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        let store = Store::open(&settings).unwrap();
        let (h, join) = store.start_writer(Arc::clone(&env), &settings).unwrap();
        let mut tasks = Vec::new();
        for i in 0..100 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.submit(Intake {
                    meta: meta(&format!("C{}", i % 50)),
                    raw: format!("MSH|CANARY{i}").into_bytes(),
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
        let store = Store::open(&settings).unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.len(), 50);
        let (id, _) = list[0];
        let body = store.sealed_body(id).unwrap().unwrap();
        assert!(env.open(id, &body).unwrap().starts_with(b"MSH|CANARY"));
        drop(store);
        let file = std::fs::read(&settings.path).unwrap();
        assert!(!file.windows(6).any(|w| w == b"CANARY"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_window_expires() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings {
            path: dir.path().join("s.redb"),
            dedup_window: Duration::from_millis(20),
            max_batch: 16,
        };
        let mut sealer = DevSealer::open_or_create(&dir.path().join("dev.key")).unwrap();
        let env = Arc::new(load_message_keys(&mut sealer, dir.path()).unwrap());
        let store = Store::open(&settings).unwrap();
        let (h, _join) = store.start_writer(env, &settings).unwrap();
        let submit = |ctrl: &str| {
            h.submit(Intake {
                meta: meta(ctrl),
                raw: b"MSH|x".to_vec(),
            })
        };
        assert_eq!(submit("A").await.unwrap(), Stored::New(1));
        assert_eq!(submit("A").await.unwrap(), Stored::Duplicate(1));
        // The window is what is under test: let it pass, then any commit prunes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(submit("B").await.unwrap(), Stored::New(2));
        assert_eq!(submit("A").await.unwrap(), Stored::New(3));
    }
}
