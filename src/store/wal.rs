//! The intake write-ahead log: what makes a message durable before its ACK.
//!
//! Format: segment files `<state>/wal/<first id, 20 digits>.wal`, each a sequence of frames
//! `payload length u32 BE | CRC-32 of payload u32 BE | payload`, payload =
//! `id u64 BE | received ms u64 BE | 16 zero bytes | destination count u8 | (name length u8 |
//! name)* | messages-table record`, then zeros to the segment's end. (Format 1 held a digest of
//! the duplicate key in the 16 bytes; they are never read, replay derives the key from the
//! record.) The destinations are the message's queue entries, logged in the same frame as the
//! message so both become durable together (promise 2). The record holds the metadata and the
//! sealed body exactly as the `messages` table stores them, so the log holds no plaintext PHI
//! either.
//!
//! Segments are zero-filled to [`SEGMENT_BYTES`] before they take frames (a background thread
//! fills the next one, `spare`, while the current one's second half is written), so an append
//! overwrites blocks that are already allocated and its synchronous write (`O_DSYNC`: one
//! syscall where a write and an `fdatasync` were two) writes data only: no block allocation,
//! no size change, no filesystem journal commit. That nearly halves the cost of a sync here
//! (see the README's performance section).
//!
//! Invariants:
//! - A batch is written with one `O_DSYNC` write; only then are its senders answered.
//! - A failed append is zeroed (or cut) back to the last whole frame, so a later append never
//!   follows garbage.
//! - A segment is deleted only when every id in it is in a durable redb commit.
//! - Replay stops at a zero frame header (the unwritten rest of a segment) or at a torn frame:
//!   frames after a torn one were never acknowledged (their fsync had not returned).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Size segments are zero-filled to; a batch that does not fit starts a new segment.
const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// The zero-filled segment kept ready for the next rotation, and its name while being filled.
const SPARE: &str = "spare";
const SPARE_PARTIAL: &str = "spare.partial";
/// Free space below which no spare is made: four segments.
const SPARE_MIN_FREE: u64 = 4 * SEGMENT_BYTES;
const FRAME_HEADER: usize = 8;
const PAYLOAD_HEADER: usize = 8 + 8 + 16;

/// One logged message.
pub struct WalRecord {
    pub id: u64,
    pub received_ms: u64,
    /// Key in the duplicate index, derived from `meta` (not logged).
    pub dedup_key: Vec<u8>,
    /// The metadata in `record`, parsed (not logged: decoding parses it again).
    pub meta: Option<Box<super::Meta>>,
    /// Destinations the message is queued for (names, at most 255 of at most 255 bytes).
    pub destinations: Vec<String>,
    /// The `messages` table record: metadata and sealed body.
    pub record: Vec<u8>,
}

impl WalRecord {
    fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER]);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.received_ms.to_be_bytes());
        out.extend_from_slice(&[0u8; 16]);
        // Names are validated to 64 bytes and a route list to fewer than 255 destinations.
        let dests = &self.destinations[..self.destinations.len().min(255)];
        out.push(dests.len() as u8);
        for d in dests {
            let name = &d.as_bytes()[..d.len().min(255)];
            out.push(name.len() as u8);
            out.extend_from_slice(name);
        }
        out.extend_from_slice(&self.record);
        let len = (out.len() - start - FRAME_HEADER) as u32;
        let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    }

    fn decode(payload: &[u8]) -> Option<WalRecord> {
        let id = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
        let received_ms = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
        let count = *payload.get(PAYLOAD_HEADER)? as usize;
        let mut pos = PAYLOAD_HEADER + 1;
        let mut destinations = Vec::with_capacity(count);
        for _ in 0..count {
            let len = *payload.get(pos)? as usize;
            let name = payload.get(pos + 1..pos + 1 + len)?;
            destinations.push(String::from_utf8(name.to_vec()).ok()?);
            pos += 1 + len;
        }
        let record = payload.get(pos..)?.to_vec();
        let meta = super::split_record(&record).map(|(m, _)| Box::new(m));
        Some(WalRecord {
            id,
            received_ms,
            dedup_key: meta.as_deref().map(super::dedup_key).unwrap_or_default(),
            meta,
            destinations,
            record,
        })
    }
}

struct Segment {
    path: PathBuf,
    /// Highest id appended to it (0 when empty).
    max_id: u64,
}

/// The open log.
pub struct Wal {
    dir: PathBuf,
    file: File,
    /// Where the next frame goes: the bytes written to the current segment.
    len: u64,
    /// Zero-filled size of the current segment (0: not preallocated, it grows with each append).
    capacity: u64,
    /// Older segments first; the last one is `file`.
    segments: Vec<Segment>,
    buf: Vec<u8>,
    /// Asks the background thread for a new spare; dropping it ends the thread.
    want_spare: mpsc::SyncSender<()>,
    /// Whether the current segment already asked for the next one's spare.
    spare_asked: bool,
}

fn segment_name(first_id: u64) -> String {
    format!("{first_id:020}.wal")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Existing segment paths in id order.
fn list_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    paths.sort();
    Ok(paths)
}

/// Reads every whole, intact frame of every segment in `dir`, in order. Returns the records and
/// whether the log ended cleanly (false: a segment ended in a torn frame, a crash or a failed
/// append mid-write, which was never acknowledged).
///
/// A bad frame followed by a whole frame is not a torn tail: frames after it may have been
/// acknowledged, so replay refuses (`InvalidData`, naming segment and offset) rather than drop
/// them silently. The operator decides what to do with the segment.
pub fn replay(dir: &Path) -> io::Result<(Vec<WalRecord>, bool)> {
    let mut out = Vec::new();
    let mut clean = true;
    for path in list_segments(dir)? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut pos = 0usize;
        while pos < bytes.len() {
            match frame_at(&bytes, pos) {
                Frame::Whole(record, end) => {
                    out.push(record);
                    pos = end;
                }
                Frame::End => {
                    // The unwritten rest of the segment is zeros; anything else was being
                    // written when the process stopped, and never acknowledged.
                    clean &= bytes[pos..].iter().all(|&b| b == 0);
                    break;
                }
                Frame::Bad { end } => {
                    if matches!(frame_at(&bytes, end), Frame::Whole(..)) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: corrupt frame at byte {pos} with whole frames after it; \
                                 refusing to drop them (move the segment aside to start without it)",
                                path.display(),
                            ),
                        ));
                    }
                    clean = false;
                    break;
                }
            }
        }
    }
    Ok((out, clean))
}

enum Frame {
    /// An intact frame and the offset just past it.
    Whole(WalRecord, usize),
    /// A zero header: nothing was written from here on.
    End,
    /// Torn or corrupt; `end` is where its header says it ends (or the end of the bytes).
    Bad { end: usize },
}

fn frame_at(bytes: &[u8], pos: usize) -> Frame {
    let rest = bytes.get(pos..).unwrap_or_default();
    let Some(head) = rest.get(..FRAME_HEADER) else {
        return if rest.iter().all(|&b| b == 0) {
            Frame::End
        } else {
            Frame::Bad { end: bytes.len() }
        };
    };
    if head.iter().all(|&b| b == 0) {
        return Frame::End;
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let Some(payload) = rest.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Bad { end: bytes.len() };
    };
    let end = pos + FRAME_HEADER + len;
    match (crc32fast::hash(payload) == crc)
        .then(|| WalRecord::decode(payload))
        .flatten()
    {
        Some(record) => Frame::Whole(record, end),
        None => Frame::Bad { end },
    }
}

/// Deletes every segment in `dir` (after a replay made them durable in redb).
pub fn clear(dir: &Path) -> io::Result<()> {
    for p in list_segments(dir)? {
        fs::remove_file(p)?;
    }
    if dir.exists() {
        sync_dir(dir)?;
    }
    Ok(())
}

impl Wal {
    /// Opens a fresh segment starting at `next_id`. Call after [`replay`] and [`clear`].
    pub fn create(dir: &Path, next_id: u64) -> io::Result<Wal> {
        Wal::open(dir, next_id, true)
    }

    /// `background`: whether a thread makes a new spare after each rotation (tests make their
    /// own, for determinism).
    fn open(dir: &Path, next_id: u64, background: bool) -> io::Result<Wal> {
        fs::create_dir_all(dir)?;
        // The first start of a store has no spare yet: fill one now (tens of milliseconds),
        // so the first segment is preallocated too. Without one, the segment grows instead.
        if let Err(e) = make_spare(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "Cannot prepare a write-ahead log segment; it grows as it is written.");
        }
        let (want_spare, wanted) = mpsc::sync_channel(1);
        let spare_dir = dir.to_path_buf();
        if background {
            std::thread::Builder::new()
            .name("wal-spare".into())
            .stack_size(crate::THREAD_STACK)
            .spawn(move || {
                while wanted.recv().is_ok() {
                    if let Err(e) = make_spare(&spare_dir) {
                        tracing::warn!(dir = %spare_dir.display(), error = %e, "Cannot prepare a write-ahead log segment; the next one grows as it is written.");
                        }
                    }
                })?;
        }
        let path = dir.join(segment_name(next_id));
        let (file, capacity) = take_segment(dir, &path)?;
        sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            file,
            len: 0,
            capacity,
            segments: vec![Segment { path, max_id: 0 }],
            buf: Vec::with_capacity(64 * 1024),
            want_spare,
            spare_asked: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` with one `O_DSYNC` write. On error nothing of them counts:
    /// the segment is zeroed or cut back to where it was.
    pub fn append(&mut self, records: &[WalRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        for r in records {
            r.encode_into(&mut self.buf);
        }
        let size = self.buf.len() as u64;
        if self.len > 0 && self.len + size > self.capacity.max(SEGMENT_BYTES) {
            self.rotate(records[0].id)?;
        }
        let result = self.file.write_all_at(&self.buf, self.len);
        match result {
            Ok(()) => {
                self.len += size;
                // The next segment's spare is filled while this one's second half is written:
                // not at start, where its 32 MiB of writes would compete with the first syncs.
                if !self.spare_asked && self.len > self.capacity.max(SEGMENT_BYTES) / 2 {
                    self.spare_asked = self.want_spare.try_send(()).is_ok();
                }
                if let Some(seg) = self.segments.last_mut() {
                    seg.max_id = records.iter().map(|r| r.id).max().unwrap_or(seg.max_id);
                }
                Ok(())
            }
            Err(e) => {
                // Undo the frames; if even that fails, start a new segment so the next append
                // does not follow a torn frame.
                if self.undo(size).is_err() {
                    let _ = self.rotate(records[0].id);
                }
                Err(e)
            }
        }
    }

    /// Zeroes the `size` bytes after the last whole frame (or cuts a growing segment there).
    fn undo(&mut self, size: u64) -> io::Result<()> {
        if self.len < self.capacity {
            let zeros = vec![0u8; size.min(self.capacity - self.len) as usize];
            self.file.write_all_at(&zeros, self.len)?;
        }
        if self.len + size > self.capacity {
            self.file.set_len(self.len.max(self.capacity))?;
        }
        self.file.sync_data()
    }

    fn rotate(&mut self, first_id: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first_id));
        let (file, capacity) = take_segment(&self.dir, &path)?;
        sync_dir(&self.dir)?;
        self.spare_asked = false;
        self.file = file;
        self.len = 0;
        self.capacity = capacity;
        self.segments.push(Segment { path, max_id: 0 });
        Ok(())
    }

    /// Deletes the older segments whose every id is durable in redb.
    pub fn release(&mut self, durable_id: u64) {
        while self.segments.len() > 1 && self.segments[0].max_id <= durable_id {
            let seg = self.segments.remove(0);
            if let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(path = %seg.path.display(), error = %e, "Cannot delete a released WAL segment.");
            }
        }
    }

    /// At shutdown: when every id is durable, delete all segments (the spare stays, for the
    /// next start).
    pub fn close(self, durable_id: u64) {
        if self.segments.iter().all(|s| s.max_id <= durable_id) {
            let _ = clear(&self.dir);
        }
    }
}

/// Makes `path` the next segment: the spare when one is ready (zero-filled, returned with its
/// size), else a new empty file that grows as it is written.
fn take_segment(dir: &Path, path: &Path) -> io::Result<(File, u64)> {
    let capacity = match fs::rename(dir.join(SPARE), path) {
        Ok(()) => fs::metadata(path)?.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_DSYNC)
        .open(path)?;
    Ok((file, capacity))
}

/// Zero-fills `spare.partial` to [`SEGMENT_BYTES`], syncs it, and renames it `spare` (unless a
/// spare is there already). Only whole spares are ever taken. Skipped (an error) when the
/// filesystem has less than [`SPARE_MIN_FREE`] free, so a spare never takes the space intake needs.
fn make_spare(dir: &Path) -> io::Result<()> {
    if dir.join(SPARE).exists() {
        return Ok(());
    }
    let stat = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    if free < SPARE_MIN_FREE {
        return Err(io::Error::other(format!(
            "{free} bytes free, a spare segment needs {SPARE_MIN_FREE}"
        )));
    }
    let partial = dir.join(SPARE_PARTIAL);
    let fill = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&partial)?;
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..SEGMENT_BYTES / zeros.len() as u64 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        fs::rename(&partial, dir.join(SPARE))
    };
    let result = fill();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> WalRecord {
        WalRecord {
            id,
            received_ms: 7,
            dedup_key: vec![id as u8; 16],
            meta: None,
            destinations: vec!["hospital".into(), "lab".into()],
            record: vec![id as u8; 100],
        }
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let mut wal = Wal::open(&wal_dir, 1, false).unwrap();
        // The segment is zero-filled ahead of the frames.
        assert_eq!(wal.capacity, SEGMENT_BYTES);
        wal.append(&[rec(1), rec(2)]).unwrap();
        wal.append(&[rec(3)]).unwrap();
        let len = wal.len as usize;
        drop(wal);
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(clean);
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(records[2].record, vec![3u8; 100]);
        assert_eq!(records[2].destinations, ["hospital", "lab"]);
        let seg = list_segments(&wal_dir).unwrap().remove(0);
        assert_eq!(fs::metadata(&seg).unwrap().len(), SEGMENT_BYTES);
        let written = fs::read(&seg).unwrap()[..len].to_vec();
        let rewrite = |bytes: &[u8]| {
            let mut all = bytes.to_vec();
            all.resize(SEGMENT_BYTES as usize, 0);
            fs::write(&seg, &all).unwrap();
        };
        // A torn tail (crash mid-write: the last bytes never reached the disk) stops the replay
        // at the last whole frame.
        let mut bytes = written.clone();
        bytes[len - 5..].fill(0);
        rewrite(&bytes);
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(!clean);
        assert_eq!(records.len(), 2);
        // A flipped byte in the last whole frame is caught by the CRC: a torn tail.
        let frame = len / 3;
        let mut bytes = written[..2 * frame].to_vec();
        let second = frame + FRAME_HEADER + 3;
        bytes[second] ^= 1;
        rewrite(&bytes);
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(!clean);
        assert_eq!(records.len(), 1);
        // A corrupt frame with whole frames after it is refused, not silently dropped.
        bytes[second] ^= 1;
        bytes[FRAME_HEADER + 3] ^= 1;
        rewrite(&bytes);
        let Err(err) = replay(&wal_dir) else {
            panic!("a corrupt frame before others must be refused")
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt frame at byte 0"), "{err}");
        // Bytes after the zero end (a write that never finished) are no frames, and say so.
        let mut bytes = written.clone();
        bytes.extend_from_slice(&[0; 64]);
        bytes.extend_from_slice(b"half a frame");
        rewrite(&bytes);
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(!clean);
        assert_eq!(records.len(), 3);
        clear(&wal_dir).unwrap();
        assert!(list_segments(&wal_dir).unwrap().is_empty());
    }

    #[test]
    fn a_failed_append_is_zeroed_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, false).unwrap();
        wal.append(&[rec(1)]).unwrap();
        // The frames of a batch whose fsync failed are on the page cache: undo zeroes them.
        let mut buf = Vec::new();
        rec(2).encode_into(&mut buf);
        wal.file.write_all_at(&buf, wal.len).unwrap();
        wal.undo(buf.len() as u64).unwrap();
        wal.append(&[rec(3)]).unwrap();
        let (records, clean) = replay(dir.path()).unwrap();
        assert!(clean);
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn rotation_takes_the_spare_or_grows_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, false).unwrap();
        wal.append(&[rec(1)]).unwrap();
        make_spare(dir.path()).unwrap();
        wal.rotate(2).unwrap();
        assert_eq!(wal.capacity, SEGMENT_BYTES);
        wal.append(&[rec(2)]).unwrap();
        // No spare ready (the background thread behind): the segment grows as it is written.
        let _ = fs::remove_file(dir.path().join(SPARE));
        wal.rotate(3).unwrap();
        assert_eq!(wal.capacity, 0);
        wal.append(&[rec(3)]).unwrap();
        wal.append(&[rec(4)]).unwrap();
        let (records, clean) = replay(dir.path()).unwrap();
        assert!(clean);
        assert_eq!(
            records.iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn the_next_spare_is_asked_for_once_the_segment_is_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, false).unwrap();
        let (tx, asked) = mpsc::sync_channel(1);
        wal.want_spare = tx;
        let big = |id| WalRecord {
            record: vec![7; 1024 * 1024],
            ..rec(id)
        };
        // Frames of a little over 1 MiB: the 16th passes half of 32 MiB.
        let half = SEGMENT_BYTES / (1024 * 1024) / 2;
        for id in 1..half {
            wal.append(&[big(id)]).unwrap();
        }
        assert!(asked.try_recv().is_err(), "not before half the segment");
        wal.append(&[big(half)]).unwrap();
        assert!(asked.try_recv().is_ok());
        wal.append(&[big(half + 1)]).unwrap();
        assert!(asked.try_recv().is_err(), "once per segment");
    }

    #[test]
    fn a_torn_segment_does_not_hide_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, false).unwrap();
        wal.append(&[rec(1), rec(2)]).unwrap();
        // A failed append that could not be cut back leaves a torn frame, then a new segment.
        wal.file.write_all_at(&[0, 0, 1, 0, 1, 2], wal.len).unwrap();
        wal.rotate(3).unwrap();
        wal.append(&[rec(3)]).unwrap();
        let (records, clean) = replay(dir.path()).unwrap();
        assert!(!clean);
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn release_keeps_segments_with_undurable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, false).unwrap();
        wal.append(&[rec(1)]).unwrap();
        wal.rotate(2).unwrap();
        wal.append(&[rec(2)]).unwrap();
        wal.release(0);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 2);
        wal.release(1);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        wal.close(2);
        assert!(list_segments(dir.path()).unwrap().is_empty());
    }
}
