//! The intake write-ahead log: what makes a message durable before its ACK.
//!
//! Format: segment files `<state>/wal/<first id, 20 digits>.wal`, each a sequence of frames
//! `payload length u32 BE | CRC-32 of payload u32 BE | payload`, payload =
//! `id u64 BE | received ms u64 BE | dedup key [16] | destination count u8 | (name length u8 |
//! name)* | messages-table record`. The destinations are the message's queue entries, logged in
//! the same frame as the message so both become durable together (promise 2). The record holds the
//! metadata and the sealed body exactly as the `messages` table stores them, so the log holds no
//! plaintext PHI either.
//!
//! Invariants:
//! - A batch is appended with one write and one `fdatasync`; only then are its senders answered.
//! - A failed append is cut back to the last whole frame, so a later append never follows garbage.
//! - A segment is deleted only when every id in it is in a durable redb commit.
//! - Replay stops at the first torn or corrupt frame: frames after it were never acknowledged
//!   (their fsync had not returned) when the tail is torn by a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Start a new segment past this size.
const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
const FRAME_HEADER: usize = 8;
const PAYLOAD_HEADER: usize = 8 + 8 + 16;

/// One logged message.
pub struct WalRecord {
    pub id: u64,
    pub received_ms: u64,
    pub dedup_key: [u8; 16],
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
        out.extend_from_slice(&self.dedup_key);
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
        let dedup_key = payload.get(16..32)?.try_into().ok()?;
        let count = *payload.get(PAYLOAD_HEADER)? as usize;
        let mut pos = PAYLOAD_HEADER + 1;
        let mut destinations = Vec::with_capacity(count);
        for _ in 0..count {
            let len = *payload.get(pos)? as usize;
            let name = payload.get(pos + 1..pos + 1 + len)?;
            destinations.push(String::from_utf8(name.to_vec()).ok()?);
            pos += 1 + len;
        }
        Some(WalRecord {
            id,
            received_ms,
            dedup_key,
            destinations,
            record: payload.get(pos..)?.to_vec(),
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
    len: u64,
    /// Older segments first; the last one is `file`.
    segments: Vec<Segment>,
    buf: Vec<u8>,
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
/// A bad frame with more bytes after it in its segment is not a torn tail: frames after it may
/// have been acknowledged, so replay refuses (`InvalidData`, naming segment and offset) rather
/// than drop them silently. The operator decides what to do with the segment.
pub fn replay(dir: &Path) -> io::Result<(Vec<WalRecord>, bool)> {
    let mut out = Vec::new();
    let mut clean = true;
    for path in list_segments(dir)? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut pos = 0usize;
        while pos < bytes.len() {
            let Some(head) = bytes.get(pos..pos + FRAME_HEADER) else {
                clean = false;
                break;
            };
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let end = pos + FRAME_HEADER + len;
            let Some(payload) = bytes.get(pos + FRAME_HEADER..end) else {
                clean = false;
                break;
            };
            let record = (crc32fast::hash(payload) == crc)
                .then(|| WalRecord::decode(payload))
                .flatten();
            match record {
                Some(r) => out.push(r),
                None if end >= bytes.len() => {
                    clean = false;
                    break;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: corrupt frame at byte {pos} with {} bytes of frames after it; \
                             refusing to drop them (move the segment aside to start without it)",
                            path.display(),
                            bytes.len() - end
                        ),
                    ))
                }
            }
            pos = end;
        }
    }
    Ok((out, clean))
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
        fs::create_dir_all(dir)?;
        let path = dir.join(segment_name(next_id));
        let file = open_segment(&path)?;
        sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            file,
            len: 0,
            segments: vec![Segment { path, max_id: 0 }],
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` with one write and one fdatasync. On error nothing of them counts:
    /// the segment is cut back to where it was.
    pub fn append(&mut self, records: &[WalRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if self.len >= SEGMENT_BYTES {
            self.rotate(records[0].id)?;
        }
        self.buf.clear();
        for r in records {
            r.encode_into(&mut self.buf);
        }
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                if let Some(seg) = self.segments.last_mut() {
                    seg.max_id = records.iter().map(|r| r.id).max().unwrap_or(seg.max_id);
                }
                Ok(())
            }
            Err(e) => {
                // Cut back to the last whole frame; if even that fails, start a new segment so
                // the next append does not follow a torn frame.
                if self.file.set_len(self.len).is_err() || self.file.sync_data().is_err() {
                    let _ = self.rotate(records[0].id);
                }
                Err(e)
            }
        }
    }

    fn rotate(&mut self, first_id: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first_id));
        let file = open_segment(&path)?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.len = 0;
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

    /// At shutdown: when every id is durable, delete all segments.
    pub fn close(self, durable_id: u64) {
        if self.segments.iter().all(|s| s.max_id <= durable_id) {
            let _ = clear(&self.dir);
        }
    }
}

fn open_segment(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> WalRecord {
        WalRecord {
            id,
            received_ms: 7,
            dedup_key: [id as u8; 16],
            destinations: vec!["hospital".into(), "lab".into()],
            record: vec![id as u8; 100],
        }
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let mut wal = Wal::create(&wal_dir, 1).unwrap();
        wal.append(&[rec(1), rec(2)]).unwrap();
        wal.append(&[rec(3)]).unwrap();
        drop(wal);
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(clean);
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(records[2].record, vec![3u8; 100]);
        assert_eq!(records[2].destinations, ["hospital", "lab"]);
        // A torn tail (crash mid-write) stops the replay at the last whole frame.
        let seg = list_segments(&wal_dir).unwrap().remove(0);
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(!clean);
        assert_eq!(records.len(), 2);
        // A flipped byte in the last whole frame is caught by the CRC: a torn tail.
        let frame = (len / 3) as usize;
        let mut bytes = fs::read(&seg).unwrap();
        bytes.truncate(2 * frame);
        let second = frame + FRAME_HEADER + 3;
        bytes[second] ^= 1;
        fs::write(&seg, &bytes).unwrap();
        let (records, clean) = replay(&wal_dir).unwrap();
        assert!(!clean);
        assert_eq!(records.len(), 1);
        // A corrupt frame with frames after it is refused, not silently dropped.
        bytes[second] ^= 1;
        bytes[FRAME_HEADER + 3] ^= 1;
        fs::write(&seg, &bytes).unwrap();
        let Err(err) = replay(&wal_dir) else {
            panic!("a corrupt frame before others must be refused")
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt frame at byte 0"), "{err}");
        clear(&wal_dir).unwrap();
        assert!(list_segments(&wal_dir).unwrap().is_empty());
    }

    #[test]
    fn a_torn_segment_does_not_hide_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        wal.append(&[rec(1), rec(2)]).unwrap();
        // A failed append that could not be cut back leaves a torn frame, then a new segment.
        let seg = list_segments(dir.path()).unwrap().remove(0);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&[0, 0, 1, 0, 1, 2])
            .unwrap();
        wal.rotate(3).unwrap();
        wal.append(&[rec(3)]).unwrap();
        let (records, clean) = replay(dir.path()).unwrap();
        assert!(!clean);
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn release_keeps_segments_with_undurable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
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
