//! Every change to the redb tables, on one write transaction: messages with their queue entries,
//! delivery outcomes, dead letters, replays, retention. The applier, the offline `queue` commands
//! and recovery all go through these functions, so the tables and the counters stay consistent.
//!
//! Tables:
//! - `messages`: `u64 id -> meta length u32 BE | JSON metadata | sealed body`.
//! - `dedup`: `16-byte key -> (id, received ms)`.
//! - `queue`: `(destination, seq) -> (message id, queued ms, attempts)`. A destination's queue
//!   is its key range, in seq order: intake uses the message id as seq, a replay takes new seqs
//!   past every id in use, so a replayed message goes to the back.
//! - `dead`: `(destination, message id) -> JSON DeadLetter`.
//! - `dead_time`: `(dead ms, destination, message id) -> ()`: `dead` by time, for retention.
//! - `refs`: `message id -> queue and dead entries left`. When it reaches zero the message is
//!   done and goes to `done`.
//! - `done`: `(done ms, message id) -> ()`, the retention sweep's index.
//! - `counters`: `name -> u64`: `live_bytes` (message records stored), `next_id` (every id and
//!   seq below it is in use), `depth/<destination>`, `dead/<destination>`.

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::wal::WalRecord;
use super::{dedup_key, split_record, write_err, StoreError};

pub(super) const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// Duplicate index: [`super::dedup_key`] -> (id, received ms).
pub(super) const DEDUP: TableDefinition<&[u8], (u64, u64)> =
    TableDefinition::new("dedup_by_sender");
/// The index of store format 1, keyed by a hash of the whole key; replaced by [`DEDUP`].
pub(super) const DEDUP_HASHED: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("dedup");
pub(super) const QUEUE: TableDefinition<(&str, u64), (u64, u64, u32)> =
    TableDefinition::new("queue");
pub(super) const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
/// Dead letters by the time they died, so the retention sweep reads only the expired ones.
pub(super) const DEAD_TIME: TableDefinition<(u64, &str, u64), ()> =
    TableDefinition::new("dead_time");
pub(super) const REFS: TableDefinition<u64, u32> = TableDefinition::new("refs");
pub(super) const DONE: TableDefinition<(u64, u64), ()> = TableDefinition::new("done");
pub(super) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub(super) const LIVE_BYTES: &str = "live_bytes";
pub(super) const NEXT_ID: &str = "next_id";

pub(super) fn depth_key(dest: &str) -> String {
    format!("depth/{dest}")
}
pub(super) fn dead_key(dest: &str) -> String {
    format!("dead/{dest}")
}

/// When the oldest entry of `dest`'s queue was queued.
pub(super) fn oldest_queued(
    queue: &impl ReadableTable<(&'static str, u64), (u64, u64, u32)>,
    dest: &str,
) -> Result<Option<u64>, redb::StorageError> {
    Ok(queue
        .range((dest, 0)..=(dest, u64::MAX))?
        .next()
        .transpose()?
        .map(|(_, v)| v.value().1))
}

/// The `counters` table, held in memory by its one writer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u64>);

impl Counts {
    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
    fn add(&mut self, key: &str, delta: i64) {
        let v = self.0.entry(key.to_string()).or_insert(0);
        *v = if delta >= 0 {
            v.saturating_add(delta as u64)
        } else {
            v.saturating_sub(delta.unsigned_abs())
        };
    }
    fn raise(&mut self, key: &str, at_least: u64) {
        let v = self.0.entry(key.to_string()).or_insert(0);
        *v = (*v).max(at_least);
    }
    pub(super) fn load(
        table: &impl ReadableTable<&'static str, u64>,
    ) -> Result<Counts, StoreError> {
        let mut map = BTreeMap::new();
        for row in table.iter().map_err(super::read_err)? {
            let (k, v) = row.map_err(super::read_err)?;
            map.insert(k.value().to_string(), v.value());
        }
        Ok(Counts(map))
    }
}

/// Why and how a message left its queue for the dead letters. Metadata only: the ACK's text may
/// carry PHI and is never kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: u64,
    pub reason: String,
    pub attempts: u32,
    /// MSA-1 of the last answer (`AR`, `AE`, ...), when there was one.
    pub last_ack: Option<String>,
    /// ERR-3.1 of the last answer, when numeric.
    pub last_error_code: Option<u16>,
    pub queued_ms: u64,
    pub dead_ms: u64,
}

/// Which dead letters a replay or discard takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// `None`: every destination.
    pub destination: Option<String>,
    /// `None`: every message (replay `--all`).
    pub message_id: Option<u64>,
}

impl Selector {
    fn takes(&self, dest: &str, id: u64) -> bool {
        self.destination.as_deref().map_or(true, |d| d == dest)
            && self.message_id.map_or(true, |m| m == id)
    }
}

/// Most dead letters one replay call re-queues (each needs a seq from the reserved range).
pub const REPLAY_MAX: u64 = 1 << 20;

pub(super) struct Txn<'t> {
    messages: Table<'t, u64, &'static [u8]>,
    dedup: Table<'t, &'static [u8], (u64, u64)>,
    queue: Table<'t, (&'static str, u64), (u64, u64, u32)>,
    dead: Table<'t, (&'static str, u64), &'static [u8]>,
    dead_time: Table<'t, (u64, &'static str, u64), ()>,
    refs: Table<'t, u64, u32>,
    done: Table<'t, (u64, u64), ()>,
    counters: Table<'t, &'static str, u64>,
    pub counts: Counts,
}

impl<'t> Txn<'t> {
    /// Opens every table; `counts` is the writer's copy, or `None` to load it from the table.
    pub fn open(tx: &'t WriteTransaction, counts: Option<Counts>) -> Result<Txn<'t>, StoreError> {
        let counters = tx.open_table(COUNTERS).map_err(write_err)?;
        let counts = match counts {
            Some(c) => c,
            None => Counts::load(&counters)?,
        };
        Ok(Txn {
            messages: tx.open_table(MESSAGES).map_err(write_err)?,
            dedup: tx.open_table(DEDUP).map_err(write_err)?,
            queue: tx.open_table(QUEUE).map_err(write_err)?,
            dead: tx.open_table(DEAD).map_err(write_err)?,
            dead_time: tx.open_table(DEAD_TIME).map_err(write_err)?,
            refs: tx.open_table(REFS).map_err(write_err)?,
            done: tx.open_table(DONE).map_err(write_err)?,
            counters,
            counts,
        })
    }

    /// Writes the counters back; returns them for the writer's copy.
    pub fn finish(mut self) -> Result<Counts, StoreError> {
        for (k, v) in &self.counts.0 {
            self.counters.insert(k.as_str(), *v).map_err(write_err)?;
        }
        Ok(self.counts)
    }

    pub fn has_message(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.messages.get(id).map_err(write_err)?.is_some())
    }

    /// Stores a logged message and its queue entries.
    pub fn insert_record(&mut self, r: &WalRecord) -> Result<(), StoreError> {
        self.messages
            .insert(r.id, r.record.as_slice())
            .map_err(write_err)?;
        if !r.dedup_key.is_empty() {
            self.dedup
                .insert(r.dedup_key.as_slice(), (r.id, r.received_ms))
                .map_err(write_err)?;
        }
        for d in &r.destinations {
            self.queue
                .insert((d.as_str(), r.id), (r.id, r.received_ms, 0))
                .map_err(write_err)?;
            self.counts.add(&depth_key(d), 1);
        }
        if r.destinations.is_empty() {
            // Unrouted: kept until retention, like a delivered message.
            self.done
                .insert((r.received_ms, r.id), ())
                .map_err(write_err)?;
        } else {
            self.refs
                .insert(r.id, r.destinations.len() as u32)
                .map_err(write_err)?;
        }
        self.counts.add(LIVE_BYTES, r.record.len() as i64);
        self.counts.raise(NEXT_ID, r.id + 1);
        Ok(())
    }

    /// One queue or dead entry of `id` is gone; at zero the message is done (kept for
    /// `retention` from `now`), or deleted at once when `delete_now`.
    fn release_ref(&mut self, id: u64, now: u64, delete_now: bool) -> Result<(), StoreError> {
        let left = self
            .refs
            .get(id)
            .map_err(write_err)?
            .map(|v| v.value())
            .unwrap_or(1);
        if left > 1 {
            self.refs.insert(id, left - 1).map_err(write_err)?;
            return Ok(());
        }
        self.refs.remove(id).map_err(write_err)?;
        if delete_now {
            self.delete_message(id)
        } else {
            self.done.insert((now, id), ()).map_err(write_err)?;
            Ok(())
        }
    }

    fn delete_message(&mut self, id: u64) -> Result<(), StoreError> {
        let removed = self
            .messages
            .remove(id)
            .map_err(write_err)?
            .map(|v| v.value().to_vec());
        if let Some(rec) = removed {
            self.counts.add(LIVE_BYTES, -(rec.len() as i64));
            if let Some((meta, _)) = split_record(&rec) {
                let key = dedup_key(&meta);
                let owned = self
                    .dedup
                    .get(key.as_slice())
                    .map_err(write_err)?
                    .is_some_and(|v| v.value().0 == id);
                if owned {
                    self.dedup.remove(key.as_slice()).map_err(write_err)?;
                }
            }
        }
        Ok(())
    }

    /// The destination acknowledged `seq` with AA/CA.
    pub fn delivered(&mut self, dest: &str, seq: u64, now: u64) -> Result<(), StoreError> {
        let entry = self
            .queue
            .remove((dest, seq))
            .map_err(write_err)?
            .map(|v| v.value().0);
        if let Some(id) = entry {
            self.counts.add(&depth_key(dest), -1);
            self.release_ref(id, now, false)?;
        }
        Ok(())
    }

    /// Records a failed attempt count on a queue entry (it survives a restart).
    pub fn attempted(&mut self, dest: &str, seq: u64, attempts: u32) -> Result<(), StoreError> {
        let entry = self
            .queue
            .get((dest, seq))
            .map_err(write_err)?
            .map(|v| v.value());
        if let Some((id, queued, _)) = entry {
            self.queue
                .insert((dest, seq), (id, queued, attempts))
                .map_err(write_err)?;
        }
        Ok(())
    }

    /// Moves a queue entry to the dead letters.
    pub fn kill(&mut self, dest: &str, seq: u64, letter: &DeadLetter) -> Result<(), StoreError> {
        let removed = self.queue.remove((dest, seq)).map_err(write_err)?.is_some();
        if !removed {
            return Ok(());
        }
        let json = serde_json::to_vec(letter).unwrap_or_default();
        let previous = self
            .dead
            .insert((dest, letter.message_id), json.as_slice())
            .map_err(write_err)?
            .map(|v| dead_ms_of(v.value()));
        if let Some(Some(old_ms)) = previous {
            self.dead_time
                .remove((old_ms, dest, letter.message_id))
                .map_err(write_err)?;
        }
        self.dead_time
            .insert((letter.dead_ms, dest, letter.message_id), ())
            .map_err(write_err)?;
        let previous = previous.is_some();
        self.counts.add(&depth_key(dest), -1);
        if previous {
            // Already dead here once (replayed and died again): one ref for one entry.
            self.release_ref(letter.message_id, letter.dead_ms, false)?;
        } else {
            self.counts.add(&dead_key(dest), 1);
        }
        Ok(())
    }

    /// Removes a dead letter and its time index entry.
    fn remove_dead(&mut self, dest: &str, id: u64) -> Result<(), StoreError> {
        let removed = self.dead.remove((dest, id)).map_err(write_err)?;
        if let Some(ms) = removed.and_then(|v| dead_ms_of(v.value())) {
            self.dead_time.remove((ms, dest, id)).map_err(write_err)?;
        }
        Ok(())
    }

    /// Builds `dead_time` from `dead` when it is empty (a store from before the index).
    pub fn index_dead_letters(&mut self) -> Result<(), StoreError> {
        if !self.dead_time.is_empty().map_err(write_err)? {
            return Ok(());
        }
        let mut rows = Vec::new();
        for row in self.dead.iter().map_err(write_err)? {
            let (k, v) = row.map_err(write_err)?;
            let (dest, id) = k.value();
            // An unreadable letter stays out of the index: never purged on a guess.
            if let Some(ms) = dead_ms_of(v.value()) {
                rows.push((ms, dest.to_string(), id));
            }
        }
        for (ms, dest, id) in rows {
            self.dead_time
                .insert((ms, dest.as_str(), id), ())
                .map_err(write_err)?;
        }
        Ok(())
    }

    fn select_dead(&self, sel: &Selector) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for row in self.dead.iter().map_err(write_err)? {
            let (k, _) = row.map_err(write_err)?;
            let (dest, id) = k.value();
            if sel.takes(dest, id) {
                out.push((dest.to_string(), id));
                if out.len() as u64 >= REPLAY_MAX {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Re-queues the selected dead letters at the back of their queues, with seqs from
    /// `first_seq` on (reserved by the caller, at most [`REPLAY_MAX`]).
    pub fn replay(
        &mut self,
        sel: &Selector,
        first_seq: u64,
        now: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let picked = self.select_dead(sel)?;
        for (seq, (dest, id)) in (first_seq..).zip(picked.iter()) {
            self.remove_dead(dest, *id)?;
            self.queue
                .insert((dest.as_str(), seq), (*id, now, 0))
                .map_err(write_err)?;
            self.counts.add(&dead_key(dest), -1);
            self.counts.add(&depth_key(dest), 1);
        }
        self.counts.raise(NEXT_ID, first_seq + REPLAY_MAX);
        Ok(picked)
    }

    /// Removes the selected dead letters; their messages are then kept for `retention`.
    pub fn discard(&mut self, sel: &Selector, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let picked = self.select_dead(sel)?;
        for (dest, id) in &picked {
            self.remove_dead(dest, *id)?;
            self.counts.add(&dead_key(dest), -1);
            self.release_ref(*id, now, false)?;
        }
        Ok(picked)
    }

    /// Deletes done messages older than `done_cutoff` and dead letters older than
    /// `dead_cutoff`, at most `max` of each. Returns the ids of each that went.
    pub fn purge(
        &mut self,
        done_cutoff: u64,
        dead_cutoff: u64,
        max: usize,
    ) -> Result<(Vec<u64>, super::Affected), StoreError> {
        let mut expired = Vec::new();
        for row in self
            .done
            .range(..(done_cutoff, 0))
            .map_err(write_err)?
            .take(max)
        {
            let (k, _) = row.map_err(write_err)?;
            expired.push(k.value());
        }
        for (ms, id) in &expired {
            self.done.remove((*ms, *id)).map_err(write_err)?;
            self.delete_message(*id)?;
        }
        let mut dead = Vec::new();
        for row in self
            .dead_time
            .range(..(dead_cutoff, "", 0))
            .map_err(write_err)?
            .take(max)
        {
            let (k, _) = row.map_err(write_err)?;
            let (ms, dest, id) = k.value();
            dead.push((ms, dest.to_string(), id));
        }
        let mut purged = Vec::with_capacity(dead.len());
        for (ms, dest, id) in dead {
            self.dead_time
                .remove((ms, dest.as_str(), id))
                .map_err(write_err)?;
            if self
                .dead
                .remove((dest.as_str(), id))
                .map_err(write_err)?
                .is_some()
            {
                self.counts.add(&dead_key(&dest), -1);
                self.release_ref(id, dead_cutoff, true)?;
                purged.push((dest, id));
            }
        }
        let dead = purged;
        Ok((expired.into_iter().map(|(_, id)| id).collect(), dead))
    }

    /// Fills the duplicate index from the stored messages received since `cutoff`, newest
    /// first; returns how many entries it made.
    pub fn rebuild_dedup(&mut self, cutoff: u64) -> Result<usize, StoreError> {
        let mut made = 0;
        for row in self.messages.iter().map_err(write_err)?.rev() {
            let (k, v) = row.map_err(write_err)?;
            let Some((meta, _)) = split_record(v.value()) else {
                continue;
            };
            if meta.received_ms < cutoff {
                break;
            }
            let key = dedup_key(&meta);
            if self.dedup.get(key.as_slice()).map_err(write_err)?.is_none() {
                self.dedup
                    .insert(key.as_slice(), (k.value(), meta.received_ms))
                    .map_err(write_err)?;
                made += 1;
            }
        }
        Ok(made)
    }

    /// Removes duplicate-window entries of messages received before `cutoff`, walking
    /// `messages` in id order from `*cursor` (ids grow with time). At most `max` per call;
    /// returns how many messages it walked past.
    pub fn prune_dedup(
        &mut self,
        cutoff: u64,
        cursor: &mut u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let mut expired = Vec::new();
        for row in self.messages.range(*cursor..).map_err(write_err)?.take(max) {
            let (k, v) = row.map_err(write_err)?;
            match split_record(v.value()) {
                Some((meta, _)) if meta.received_ms >= cutoff => break,
                Some((meta, _)) => expired.push((k.value(), dedup_key(&meta))),
                None => expired.push((k.value(), Vec::new())),
            }
        }
        let walked = expired.len();
        for (id, dkey) in expired {
            *cursor = id + 1;
            let owned = self
                .dedup
                .get(dkey.as_slice())
                .map_err(write_err)?
                .is_some_and(|v| v.value().0 == id);
            if owned {
                self.dedup.remove(dkey.as_slice()).map_err(write_err)?;
            }
        }
        Ok(walked)
    }
}

/// When a stored dead letter died; `None` when it cannot be read.
fn dead_ms_of(json: &[u8]) -> Option<u64> {
    serde_json::from_slice::<DeadLetter>(json)
        .ok()
        .map(|l| l.dead_ms)
}
