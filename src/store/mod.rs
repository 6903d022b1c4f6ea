//! The durable store: redb tables and the group-commit writer.
//!
//! Every accepted message goes through one writer thread. The writer takes every message waiting
//! at that moment (up to `max_batch`), writes them in one redb write transaction with immediate
//! durability, commits (one fsync for all of them), and only then answers each submitter, which
//! then sends the ACK (promise 1). Throughput grows with concurrent connections because the fsync
//! is shared.
//!
//! On-disk format (redb tables):
//! - `messages`: `u64 id -> record`, record = `meta length u32 BE | JSON metadata | sealed body`.
//!   The metadata (listener, peer, MSH-3/4/5/6/9/10/12, size, time) carries no PHI; the body is
//!   sealed by `keys::Envelope` with the id bound as associated data, so bodies never reach redb
//!   in plaintext (promise 3). The next id is the last key plus one.
//! - `dedup`: `first 16 bytes of SHA-256(MSH-3, MSH-4, MSH-10) -> (id, received ms)`. Entries
//!   older than the window are pruned by walking `messages` in id order from a cursor.
//!
//! Two tables only: each table a commit touches adds pages to its fsync, and the fsync is the
//! cost that bounds a single connection.
//!
//! Invariants:
//! - A submitter hears `Ok` only after the commit that holds its message returned.
//! - A failed commit answers every message of the batch with an error (the sender gets AE), and
//!   none of them is counted as stored.
//! - Ids increase in commit order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreSettings;
use crate::keys::Envelope;

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const DEDUP: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("dedup");

/// How often the writer prunes expired duplicate-window entries, and how many at most per pass.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
const PRUNE_MAX: usize = 2000;

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
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store and its tables.
    pub fn open(settings: &StoreSettings) -> Result<Store, StoreError> {
        let path = settings.path.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
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
        Ok(Store {
            db: Arc::new(db),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the group-commit writer thread. It stops when every handle is dropped and the
    /// jobs already submitted are committed.
    pub fn start_writer(
        &self,
        envelope: Arc<Envelope>,
        settings: &StoreSettings,
    ) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StoreError> {
        let (tx, rx) = mpsc::channel(settings.max_batch.saturating_mul(4).max(64));
        let writer = Writer {
            db: Some(Arc::clone(&self.db)),
            path: self.path.clone(),
            envelope,
            max_batch: settings.max_batch,
            dedup_window_ms: settings.dedup_window.as_millis() as u64,
            last_prune: std::time::Instant::now(),
            prune_cursor: 0,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Write(Box::new(redb::Error::Io(e))))?;
        Ok((StoreHandle { tx }, handle))
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

struct Writer {
    /// `None` after an I/O error until the file is reopened: redb refuses every transaction
    /// after one (`PreviousIo`), so the writer closes and reopens it to recover once the disk
    /// has room again.
    db: Option<Arc<Database>>,
    path: PathBuf,
    envelope: Arc<Envelope>,
    max_batch: usize,
    dedup_window_ms: u64,
    last_prune: std::time::Instant,
    /// Messages below this id have had their duplicate-window entry pruned.
    prune_cursor: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let result = match self.database() {
                Ok(db) => self.commit(&db, &batch),
                Err(e) => Err(e),
            };
            match result {
                Ok(results) => {
                    for (job, stored) in batch.drain(..).zip(results) {
                        let _ = job.reply.send(Ok(stored));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(), "Store commit failed; senders get AE.");
                    if matches!(e, StoreError::Write(_)) {
                        self.close();
                    }
                    let e = Arc::new(e);
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
        }
    }

    /// The open database, reopening it after an I/O error.
    fn database(&mut self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = &self.db {
            return Ok(Arc::clone(db));
        }
        let db = Database::create(&self.path).map_err(|e| StoreError::Open {
            path: self.path.clone(),
            source: Box::new(e.into()),
        })?;
        tracing::warn!(path = %self.path.display(), "Store reopened after an I/O error.");
        let db = Arc::new(db);
        self.db = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Closes the database after a failed commit so the next batch reopens it. The file can only
    /// be reopened once no other handle holds it.
    fn close(&mut self) {
        if let Some(db) = self.db.take() {
            if Arc::strong_count(&db) > 1 {
                tracing::error!("Store cannot be reopened while other handles hold it.");
                self.db = Some(db);
            }
        }
    }

    fn commit(&mut self, db: &Database, batch: &[Job]) -> Result<Vec<Stored>, StoreError> {
        let mut tx = db.begin_write().map_err(write_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(write_err)?;
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut messages = tx.open_table(MESSAGES).map_err(write_err)?;
            let mut dedup = tx.open_table(DEDUP).map_err(write_err)?;
            let mut next = messages
                .last()
                .map_err(write_err)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            for job in batch {
                let meta = &job.intake.meta;
                let dkey = dedup_key(meta);
                if let Some(existing) = dedup.get(dkey.as_slice()).map_err(write_err)? {
                    results.push(Stored::Duplicate(existing.value().0));
                    continue;
                }
                let id = next;
                next += 1;
                let sealed = self
                    .envelope
                    .seal(id, &job.intake.raw)
                    .map_err(|source| StoreError::Seal { id, source })?;
                messages
                    .insert(id, make_record(meta, &sealed).as_slice())
                    .map_err(write_err)?;
                dedup
                    .insert(dkey.as_slice(), (id, meta.received_ms))
                    .map_err(write_err)?;
                results.push(Stored::New(id));
            }
            if self.last_prune.elapsed()
                >= PRUNE_EVERY.min(Duration::from_millis(self.dedup_window_ms))
            {
                self.last_prune = std::time::Instant::now();
                self.prune_dedup(&messages, &mut dedup)?;
            }
        }
        tx.commit().map_err(write_err)?;
        Ok(results)
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
