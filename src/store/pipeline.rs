//! The two store threads: the writer makes intake durable in the write-ahead log and answers
//! senders; the applier moves logged records, delivery outcomes and operator actions into redb.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot, Notify};

use super::txn::{Counts, DeadLetter, Selector, Txn, DEDUP, REPLAY_MAX};
use super::wal::{Wal, WalRecord};
use super::{
    db_of, dedup_key, make_record, now_ms, read_err, write_err, DbSlot, Job, StoreError, Stored,
};
use crate::audit::alerts::{Alerter, Levels};
use crate::audit::{self, AuditKeys, Event, Severity};
use crate::config::AuditSettings;
use crate::keys::Envelope;

/// How often the applier prunes expired duplicate-window entries and runs retention, and how
/// many entries at most per pass.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SWEEP_MAX: usize = 2000;

/// How often the applier makes its redb commits durable (and so lets the log shrink). Until
/// then it keeps what it committed (`undurable`), to apply again after a reopen: at 20,000
/// msg/s, 200 ms held 4,000 records, and the engine's peak RSS with a backlog was 64-67 MB;
/// with 100 ms it was 56-61 MB, and the backlog went faster too (bench).
const DURABLE_EVERY: Duration = Duration::from_millis(100);
/// Least time between two applier commits. Each commit rewrites every B-tree page it touched:
/// 40 ms worth of records shares those rewrites among four times as many as 10 ms did, for
/// about a fifth less CPU per message at 32 connections (bench, measured while the duplicate
/// index was still keyed by a hash), and forwarders see a message at most that much later.
const APPLY_EVERY: Duration = Duration::from_millis(40);

/// An operator action on dead letters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ControlOp {
    Replay(Selector),
    Discard(Selector),
}

/// `(destination, message id)` of each dead letter an action took.
pub type Affected = Vec<(String, u64)>;

/// What the applier is asked to do.
pub(super) enum Op {
    Records(Vec<WalRecord>),
    Delivered {
        dest: String,
        seq: u64,
    },
    Attempted {
        dest: String,
        seq: u64,
        attempts: u32,
    },
    Dead {
        dest: String,
        seq: u64,
        letter: DeadLetter,
    },
    Control {
        op: ControlOp,
        first_seq: u64,
        reply: oneshot::Sender<Result<Affected, StoreError>>,
    },
    Audit(Box<Event>),
}

/// Dedup keys of messages in the log but not yet applied to redb.
pub(super) type Pending = Arc<Mutex<HashMap<Vec<u8>, (u64, u64)>>>;

/// What the engine's other parts see of the store while it runs.
pub struct Live {
    /// Bytes of message records stored or logged (the quota's measure).
    pub live_bytes: AtomicU64,
    /// The counters table as of the last applier commit.
    pub counts: Mutex<Counts>,
    /// Woken when a destination's queue may have grown.
    pub wake: HashMap<String, Arc<Notify>>,
}

impl Live {
    fn wake_all(&self) {
        for n in self.wake.values() {
            n.notify_one();
        }
    }
}

/// What one logged batch gives back: each job's result, and the records for the applier.
type Logged = (Vec<Result<Stored, StoreError>>, Vec<WalRecord>);

/// Stage 1: makes batches durable in the write-ahead log, then answers their senders.
pub(super) struct Writer {
    /// Read-only use: duplicate checks.
    pub db: DbSlot,
    pub wal: Wal,
    pub envelope: Arc<Envelope>,
    pub max_batch: usize,
    pub dedup_window_ms: u64,
    pub quota: u64,
    pub next_id: u64,
    pub pending: Pending,
    pub durable: Arc<AtomicU64>,
    pub live: Arc<Live>,
    pub apply_tx: std::sync::mpsc::Sender<Op>,
    pub rx: mpsc::Receiver<Job>,
    /// The round's jobs; kept between rounds for its capacity.
    pub batch: Vec<Job>,
}

/// What one writer round found.
pub(super) enum Round {
    /// It logged and answered what was waiting.
    Took,
    /// Nothing was waiting.
    Empty,
    /// Nothing was waiting and every handle is gone.
    Closed,
}

/// The writer, shared between its thread and the submitters that run a round themselves.
///
/// A submitter whose message is the only one waiting, and who finds the writer free, runs the
/// round on its own thread: its message is logged with one fsync and answered without waking
/// another thread. That takes two thread hand-offs (each a wake-up of a sleeping thread) out of
/// a lone sender's ACK: one sequential connection went from about 50 % to about 70 % of the
/// disk's fsync rate (bench). Any other submitter wakes the writer thread, which batches what
/// waits; so does a leader that leaves messages behind. Under load the thread runs the rounds
/// as before and no sender's ACK waits on other connections' rounds.
///
/// The round blocks a runtime worker for one fsync. Only one round runs at a time, and a
/// submitter leads only on a multi-thread runtime with at least two workers, so the others go
/// on serving connections meanwhile (`block_in_place` would hand the worker's tasks to another
/// thread instead, and that hand-off cost as much as the two it saves).
pub(super) struct Shared {
    pub writer: Mutex<Option<Writer>>,
    pub thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Wakes the writer thread (free when it is already awake).
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Called by a submitter after queueing its job, with the number of jobs that may be
    /// waiting (its own included): leads a round when its job is alone and the writer is free,
    /// else wakes the writer thread.
    pub fn lead(&self, waiting: impl Fn() -> usize) {
        let spare_workers = tokio::runtime::Handle::try_current().is_ok_and(|h| {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                && h.metrics().num_workers() >= 2
        });
        if !spare_workers || waiting() > 1 {
            return self.wake();
        }
        let Ok(mut guard) = self.writer.try_lock() else {
            return self.wake();
        };
        if let Some(writer) = guard.as_mut() {
            writer.round();
        }
        drop(guard);
        if waiting() > 0 {
            self.wake();
        }
    }

    /// The writer thread: runs rounds while jobs wait, parks when none do, and at the end
    /// (every handle gone) lets the applier make everything durable in redb and drops the log.
    pub fn run(&self, applier: std::thread::JoinHandle<()>) {
        loop {
            let round = match self
                .writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                Some(writer) => writer.round(),
                None => Round::Closed,
            };
            match round {
                Round::Took => {}
                Round::Empty => std::thread::park(),
                Round::Closed => break,
            }
        }
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            writer.finish(applier);
        }
    }
}

impl Writer {
    /// Takes the jobs waiting now (up to `max_batch`, and up to the first operator action),
    /// logs them with one fsync and answers their senders, then hands the action on.
    pub fn round(&mut self) -> Round {
        let mut batch = std::mem::take(&mut self.batch);
        let mut control = None;
        let mut closed = false;
        while control.is_none() && batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(job @ Job::Intake { .. }) => batch.push(job),
                Ok(Job::Control { op, reply }) => control = Some((op, reply)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.is_empty() && control.is_none() {
            self.batch = batch;
            return if closed { Round::Closed } else { Round::Empty };
        }
        if !batch.is_empty() {
            self.commit_batch(&mut batch);
        }
        self.batch = batch;
        if let Some((op, reply)) = control {
            // Seqs from here on are past every id logged so far, and the applier receives
            // this after those records: a replayed message goes to the back of its queue.
            let first_seq = self.next_id;
            self.next_id += REPLAY_MAX;
            let op = Op::Control {
                op,
                first_seq,
                reply,
            };
            if let Err(std::sync::mpsc::SendError(Op::Control { reply, .. })) =
                self.apply_tx.send(op)
            {
                let _ = reply.send(Err(StoreError::WriterGone));
            }
        }
        self.wal.release(self.durable.load(Ordering::Acquire));
        Round::Took
    }

    /// Every handle is gone: let the applier make everything durable in redb, then drop the log.
    fn finish(self, applier: std::thread::JoinHandle<()>) {
        drop(self.apply_tx);
        let _ = applier.join();
        self.wal.close(self.durable.load(Ordering::Acquire));
    }

    fn commit_batch(&mut self, batch: &mut Vec<Job>) {
        match self.log(batch) {
            Ok((results, records)) => {
                // Senders first: they wait on this; the applier does not.
                for (job, stored) in batch.drain(..).zip(results) {
                    if let Job::Intake { reply, .. } = job {
                        let _ = reply.send(stored.map_err(Arc::new));
                    }
                }
                if !records.is_empty() && self.apply_tx.send(Op::Records(records)).is_err() {
                    tracing::error!(
                        "The store applier stopped; logged messages are applied at the next start."
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = batch.len(), "Store write failed; senders get AE.");
                let e = Arc::new(e);
                for job in batch.drain(..) {
                    if let Job::Intake { reply, .. } = job {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
        }
    }

    /// Checks duplicates and the quota, seals, appends the batch to the log with one fsync.
    /// Returns each job's result and the logged records, for the applier. On error nothing of
    /// the batch is stored or counted. A new message's metadata and destinations move from its
    /// job into its record.
    fn log(&mut self, batch: &mut [Job]) -> Result<Logged, StoreError> {
        let mut results = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut batch_keys: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        // An entry older than the window is no duplicate, whether or not it was pruned yet.
        let cutoff = now_ms().saturating_sub(self.dedup_window_ms);
        // Pending first, then redb: an entry leaves `pending` only after the applier committed
        // it, and not while this batch holds the lock, so the read transaction begun under the
        // lock sees every entry that is no longer pending. (Holding the lock, rather than
        // copying the map for every batch, keeps this cheap when the applier lags.)
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let db = db_of(&self.db)?;
        let tx = db.begin_read().map_err(read_err)?;
        let dedup = tx.open_table(DEDUP).map_err(read_err)?;
        let mut next = self.next_id;
        let mut bytes = self.live.live_bytes.load(Ordering::Acquire);
        for job in batch.iter_mut() {
            let Job::Intake { intake, .. } = job else {
                continue;
            };
            let meta = &intake.meta;
            let dkey = dedup_key(meta);
            let existing = match batch_keys.get(&dkey).or_else(|| pending.get(&dkey)) {
                Some(entry) => Some(*entry),
                None => dedup
                    .get(dkey.as_slice())
                    .map_err(read_err)?
                    .map(|v| v.value()),
            };
            if let Some((id, _)) = existing.filter(|(_, ms)| *ms >= cutoff) {
                results.push(Ok(Stored::Duplicate(id)));
                continue;
            }
            if bytes.saturating_add(intake.raw.len() as u64) > self.quota {
                results.push(Err(StoreError::Quota { quota: self.quota }));
                continue;
            }
            let id = next;
            next += 1;
            let sealed = self
                .envelope
                .seal(id, &intake.raw)
                .map_err(|source| StoreError::Seal { id, source })?;
            batch_keys.insert(dkey.clone(), (id, meta.received_ms));
            let mut meta = std::mem::take(&mut intake.meta);
            if let Some(mrn) = &intake.mrn {
                let mrn_sealed = self
                    .envelope
                    .seal(id | super::MRN_DOMAIN, mrn.as_bytes())
                    .map_err(|source| StoreError::Seal { id, source })?;
                meta.mrn_sealed =
                    Some(base64::engine::general_purpose::STANDARD.encode(mrn_sealed));
            }
            let record = make_record(&meta, &sealed);
            bytes += record.len() as u64;
            records.push(WalRecord {
                id,
                received_ms: meta.received_ms,
                dedup_key: dkey,
                meta: Some(Box::new(meta)),
                destinations: std::mem::take(&mut intake.destinations),
                record,
            });
            results.push(Ok(Stored::New(id)));
        }
        drop(dedup);
        drop(tx);
        drop(db);
        drop(pending);
        self.wal
            .append(&records)
            .map_err(|source| StoreError::Wal {
                path: self.wal.dir().to_path_buf(),
                source,
            })?;
        self.next_id = next;
        let added: u64 = records.iter().map(|r| r.record.len() as u64).sum();
        self.live.live_bytes.fetch_add(added, Ordering::AcqRel);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch_keys);
        Ok((results, records))
    }
}

/// What was committed without fsync, kept to re-apply after a reopen.
pub(super) enum Undurable {
    Records(Vec<WalRecord>),
    Delivered(String, u64),
    Attempted(String, u64, u32),
    Dead(String, u64, DeadLetter),
    /// Audit records from this seq on.
    Audit(u64, Vec<Event>),
}

/// The applier's share of the audit trail: chaining, checkpoints, retention, alerts.
pub(super) struct AuditState {
    pub keys: Arc<AuditKeys>,
    pub settings: AuditSettings,
    pub alerter: Alerter,
    /// Seq of the newest checkpoint, and when it was signed.
    pub last_ckpt: u64,
    pub last_ckpt_at: Instant,
    pub dests: Vec<String>,
    pub quota: u64,
    /// Alerts fired per rule, for the metrics.
    pub fired: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
}

/// Stage 2: moves logged records and outcomes into redb. Commits without fsync, and with one
/// every `DURABLE_EVERY`; the log segments are released only up to the last durable commit.
pub(super) struct Applier {
    pub db: DbSlot,
    /// Changes committed to redb without fsync since the last durable commit.
    pub undurable: Vec<Undurable>,
    pub path: PathBuf,
    pub cache: usize,
    pub pending: Pending,
    pub durable: Arc<AtomicU64>,
    pub live: Arc<Live>,
    pub counts: Counts,
    pub dedup_window_ms: u64,
    pub retention_ms: u64,
    pub dead_retention_ms: u64,
    pub last_sweep: Instant,
    /// The last sweep hit its limit: sweep again at the next commit, not a second later, so
    /// retention keeps up with any steady load.
    pub sweep_behind: bool,
    /// Messages below this id have had their duplicate-window entry pruned.
    pub prune_cursor: u64,
    pub audit: AuditState,
    /// Set for the last commit at shutdown (it signs a final checkpoint).
    pub stopping: bool,
}

impl Applier {
    pub fn new_undurable() -> Vec<Undurable> {
        Vec::new()
    }

    pub fn run(mut self, rx: std::sync::mpsc::Receiver<Op>) {
        let mut last_durable = Instant::now();
        let mut applied_max = self.durable.load(Ordering::Acquire);
        let mut dirty = false;
        let mut backlog: Vec<Op> = Vec::new();
        let mut failures = 0u64;
        let mut stopping = false;
        let mut last_apply = Instant::now();
        loop {
            let wait = if self.sweep_behind {
                APPLY_EVERY
            } else if dirty {
                DURABLE_EVERY.saturating_sub(last_durable.elapsed())
            } else {
                SWEEP_EVERY
            };
            match rx.recv_timeout(wait) {
                Ok(op) => backlog.push(op),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    stopping = true;
                    self.stopping = true;
                    if backlog.is_empty() {
                        // The last commit signs a checkpoint of the whole chain.
                        if self.commit(&mut Vec::new(), true).is_ok() {
                            self.durable.store(applied_max, Ordering::Release);
                        }
                        return;
                    }
                }
            }
            // Fewer, larger redb commits cost less CPU than one per logged batch; the log already
            // made these records durable, so waiting here delays nothing a sender sees.
            if !stopping && !backlog.iter().any(|o| matches!(o, Op::Control { .. })) {
                std::thread::sleep(APPLY_EVERY.saturating_sub(last_apply.elapsed()));
            }
            while let Ok(more) = rx.try_recv() {
                backlog.push(more);
            }
            last_apply = Instant::now();
            // An operator action is answered after a durable commit.
            let durable = stopping
                || last_durable.elapsed() >= DURABLE_EVERY
                || backlog.iter().any(|o| matches!(o, Op::Control { .. }));
            let max_in = backlog
                .iter()
                .filter_map(|o| match o {
                    Op::Records(r) => r.iter().map(|r| r.id).max(),
                    _ => None,
                })
                .max();
            match self.commit(&mut backlog, durable) {
                Ok(()) => {
                    failures = 0;
                    if let Some(max) = max_in {
                        applied_max = applied_max.max(max);
                    }
                    if durable {
                        self.undurable.clear();
                        self.durable.store(applied_max, Ordering::Release);
                        last_durable = Instant::now();
                        dirty = false;
                    } else {
                        dirty = true;
                    }
                    self.live.wake_all();
                }
                Err(e) => {
                    // The records stay in the log and in the backlog; reopen and try again.
                    tracing::error!(error = %e, changes = backlog.len(), path = %self.path.display(),
                        "Applying logged messages to the store failed; retrying.");
                    failures += 1;
                    if stopping && failures >= 3 {
                        tracing::error!("Stopping with logged messages not yet in the store; they are applied at the next start.");
                        for op in backlog.drain(..) {
                            if let Op::Control { reply, .. } = op {
                                let _ = reply.send(Err(StoreError::WriterGone));
                            }
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200 * failures.min(25)));
                    self.reopen();
                }
            }
        }
    }

    /// Closes and reopens the database after a failed commit.
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
        let reopened = super::open_db(&self.path, self.cache)
            .map_err(|e| StoreError::Open {
                path: self.path.clone(),
                source: Box::new(e.into()),
            })
            .and_then(|db| {
                let counts = reapply(&db, &self.undurable)?;
                Ok((db, counts))
            });
        match reopened {
            Ok((db, counts)) => {
                tracing::warn!(path = %self.path.display(), reapplied = self.undurable.len(), "Store reopened after an I/O error.");
                self.undurable.clear();
                self.counts = counts;
                *slot = Some(Arc::new(db));
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "Store cannot be reopened.");
            }
        }
    }

    /// Applies `ops` in one transaction. On success `ops` is emptied (control ops answered);
    /// on failure it is left as it was, to retry, and so is the alert rules' state (the retry
    /// raises the same alerts again).
    fn commit(&mut self, ops: &mut Vec<Op>, durable: bool) -> Result<(), StoreError> {
        let alerter = self.audit.alerter.clone();
        let result = self.try_commit(ops, durable);
        if result.is_err() {
            self.audit.alerter = alerter;
        }
        result
    }

    fn try_commit(&mut self, ops: &mut Vec<Op>, durable: bool) -> Result<(), StoreError> {
        let db = db_of(&self.db)?;
        let mut tx = db.begin_write().map_err(write_err)?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(write_err)?;
        let now = now_ms();
        let mut answers = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        let mut swept = false;
        let counts = {
            let mut t = Txn::open(&tx, Some(self.counts.clone()))?;
            for op in ops.iter_mut() {
                match op {
                    Op::Records(records) => {
                        for r in records.iter_mut() {
                            t.insert_record(r)?;
                            events.push(super::received_event(r));
                        }
                    }
                    Op::Delivered { dest, seq } => t.delivered(dest, *seq, now)?,
                    Op::Attempted {
                        dest,
                        seq,
                        attempts,
                    } => t.attempted(dest, *seq, *attempts)?,
                    Op::Dead { dest, seq, letter } => {
                        t.kill(dest, *seq, letter)?;
                        events.push(dead_event(dest, letter));
                    }
                    Op::Control { op, first_seq, .. } => {
                        let (what, affected) = match op {
                            ControlOp::Replay(sel) => {
                                ("message.replayed", t.replay(sel, *first_seq, now)?)
                            }
                            ControlOp::Discard(sel) => ("message.discarded", t.discard(sel, now)?),
                        };
                        for (dest, id) in &affected {
                            events.push(
                                Event::new(what)
                                    .destination(dest.as_str())
                                    .message(*id)
                                    .outcome("done"),
                            );
                        }
                        answers.push(affected);
                    }
                    Op::Audit(e) => events.push((**e).clone()),
                }
            }
            if self.sweep_behind || self.last_sweep.elapsed() >= SWEEP_EVERY {
                swept = true;
                self.last_sweep = Instant::now();
                let cutoff = now.saturating_sub(self.dedup_window_ms);
                let pruned = t.prune_dedup(cutoff, &mut self.prune_cursor, SWEEP_MAX)?;
                let before = t.counts.get(super::txn::LIVE_BYTES);
                let (done, dead) = t.purge(
                    now.saturating_sub(self.retention_ms),
                    now.saturating_sub(self.dead_retention_ms),
                    SWEEP_MAX,
                )?;
                self.sweep_behind =
                    pruned >= SWEEP_MAX || done.len() >= SWEEP_MAX || dead.len() >= SWEEP_MAX;
                let freed = before.saturating_sub(t.counts.get(super::txn::LIVE_BYTES));
                if !done.is_empty() {
                    events.push(
                        Event::new("message.purged")
                            .outcome("deleted")
                            .with("reason", "retention after delivery")
                            .with("count", done.len())
                            .with("message_ids", audit::id_ranges(&sorted(done.clone()))),
                    );
                }
                for (dest, id) in &dead {
                    events.push(
                        Event::new("message.purged")
                            .destination(dest.as_str())
                            .message(*id)
                            .outcome("deleted")
                            .with("reason", "dead letter retention"),
                    );
                }
                let (done, dead) = (done.len(), dead.len());
                if done + dead > 0 {
                    self.live.live_bytes.fetch_sub(
                        freed.min(self.live.live_bytes.load(Ordering::Acquire)),
                        Ordering::AcqRel,
                    );
                    tracing::info!(
                        delivered = done,
                        dead_letters = dead,
                        "Retention deleted expired messages."
                    );
                }
            }
            t.finish()?
        };
        let (records, checkpoint) = self.chain(&tx, events, swept, &counts, now, durable)?;
        tx.commit().map_err(write_err)?;
        if let Some(cp) = checkpoint {
            self.audit.last_ckpt = cp.seq;
            self.audit.last_ckpt_at = Instant::now();
            audit::journal_checkpoint(&cp);
        }
        self.after_chain(&records);
        // Their duplicate-index entries are in redb now: the writer's reads see them there.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops.iter() {
            if let Op::Records(logged) = op {
                for r in logged {
                    if pending.get(&r.dedup_key).is_some_and(|(id, _)| *id == r.id) {
                        pending.remove(&r.dedup_key);
                    }
                }
            }
        }
        drop(pending);
        self.counts = counts.clone();
        *self.live.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        let mut answers = answers.into_iter();
        for op in ops.drain(..) {
            match op {
                Op::Records(r) => self.undurable.push(Undurable::Records(r)),
                Op::Delivered { dest, seq } => self.undurable.push(Undurable::Delivered(dest, seq)),
                Op::Attempted {
                    dest,
                    seq,
                    attempts,
                } => self
                    .undurable
                    .push(Undurable::Attempted(dest, seq, attempts)),
                Op::Dead { dest, seq, letter } => {
                    self.undurable.push(Undurable::Dead(dest, seq, letter))
                }
                Op::Control { reply, .. } => {
                    let _ = reply.send(Ok(answers.next().unwrap_or_default()));
                }
                Op::Audit(_) => {}
            }
        }
        if let Some(first) = records.first().map(|r| r.seq) {
            self.undurable.push(Undurable::Audit(
                first,
                records.into_iter().map(|r| r.event).collect(),
            ));
        }
        Ok(())
    }

    /// Chains this commit's events (and the alerts they raise) into the audit table; runs the
    /// level alerts and audit retention on a sweep; signs a checkpoint when due, and only in a
    /// durable commit (a checkpoint never vouches for records a crash could roll back).
    /// Returns the records written and the checkpoint, to journal once committed.
    fn chain(
        &mut self,
        tx: &redb::WriteTransaction,
        mut events: Vec<Event>,
        swept: bool,
        counts: &Counts,
        now: u64,
        durable: bool,
    ) -> Result<(Vec<audit::Record>, Option<audit::Checkpoint>), StoreError> {
        let a = &mut self.audit;
        let raised: Vec<Event> = events.iter().flat_map(|e| a.alerter.observe(e)).collect();
        events.extend(raised);
        if swept {
            let queue = tx.open_table(super::txn::QUEUE).map_err(write_err)?;
            let mut queues = Vec::with_capacity(a.dests.len());
            for d in &a.dests {
                let oldest = super::txn::oldest_queued(&queue, d).map_err(write_err)?;
                queues.push((d.clone(), counts.get(&super::txn::depth_key(d)), oldest));
            }
            drop(queue);
            events.extend(a.alerter.levels(
                now,
                &Levels {
                    queues: &queues,
                    stored_bytes: counts.get(super::txn::LIVE_BYTES),
                    quota: a.quota,
                },
            ));
            let cutoff = now.saturating_sub(a.settings.retention.as_millis() as u64);
            if let Some((n, anchor)) = audit::purge(tx, cutoff, 50_000)? {
                events.push(
                    Event::new("audit.purged")
                        .outcome("deleted")
                        .with("records", n)
                        .with("through_seq", anchor),
                );
            }
        }
        let (records, head) = audit::append(tx, events)?;
        let due = durable
            && head.seq > a.last_ckpt
            && (self.stopping
                || head.seq - a.last_ckpt >= a.settings.checkpoint_every
                || a.last_ckpt_at.elapsed() >= a.settings.checkpoint_interval);
        let checkpoint = if due {
            Some(audit::put_checkpoint(tx, &a.keys, head, now)?)
        } else {
            None
        };
        Ok((records, checkpoint))
    }

    /// Journals committed records and counts the alerts among them.
    fn after_chain(&self, records: &[audit::Record]) {
        for r in records {
            if r.event.severity == Severity::Alert {
                let rule = r.event.detail.get("rule").cloned().unwrap_or_default();
                *self
                    .audit
                    .fired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(rule)
                    .or_default() += 1;
            }
            if self.audit.settings.journal_messages || audit::journals_by_default(&r.event.event) {
                audit::journal(r);
            }
        }
    }
}

fn sorted(mut ids: Vec<u64>) -> Vec<u64> {
    ids.sort_unstable();
    ids
}

/// The audit record of a queue entry moved to the dead letters.
fn dead_event(dest: &str, l: &DeadLetter) -> Event {
    let mut e = Event::new("message.dead_lettered")
        .severity(Severity::Warning)
        .destination(dest)
        .message(l.message_id)
        .outcome("dead letter")
        .with("reason", &l.reason)
        .with("attempts", l.attempts);
    if let Some(ack) = &l.last_ack {
        e = e.with("last_ack", ack);
    }
    if let Some(code) = l.last_error_code {
        e = e.with("last_error_code", code);
    }
    e
}

/// Applies again, durably, what a reopen rolled back; returns the counters after. A reopen
/// after an error other than I/O keeps the commits instead (redb makes them durable on close):
/// what is already there is not applied twice.
fn reapply(db: &Database, changes: &[Undurable]) -> Result<Counts, StoreError> {
    let tx = db.begin_write().map_err(write_err)?;
    let now = now_ms();
    let counts = {
        let mut t = Txn::open(&tx, None)?;
        for c in changes {
            match c {
                Undurable::Records(records) => {
                    for r in records {
                        if !t.has_message(r.id)? {
                            t.insert_record(r)?;
                        }
                    }
                }
                Undurable::Delivered(dest, seq) => t.delivered(dest, *seq, now)?,
                Undurable::Attempted(dest, seq, n) => t.attempted(dest, *seq, *n)?,
                Undurable::Dead(dest, seq, letter) => t.kill(dest, *seq, letter)?,
                Undurable::Audit(..) => {}
            }
        }
        t.finish()?
    };
    for c in changes {
        if let Undurable::Audit(first, events) = c {
            if audit::head(&tx)?.seq < *first {
                audit::append(&tx, events.clone())?;
            }
        }
    }
    tx.commit().map_err(write_err)?;
    Ok(counts)
}
