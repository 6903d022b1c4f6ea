//! MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 1 and the release 2 commit blocks).
//!
//! A frame is `0x0B <payload> 0x1C 0x0D`. The [`Deframer`] is sans-IO: the connection pushes the
//! bytes it read and pulls [`Event`]s until none is left.
//!
//! Invariants:
//! - Bytes outside a frame are discarded and counted, never delivered.
//! - A start block inside an unfinished frame ends that frame as truncated (counted) and starts a
//!   new one: `0x0B` never occurs inside a well-formed HL7 payload.
//! - A frame ends at `0x1C`; the `0x0D` that should follow is consumed when it arrives, and its
//!   absence is tolerated, so a sender that omits it is not left waiting.
//! - A payload never grows past `max_size` bytes: the deframer reports [`Event::Oversized`] with
//!   a bounded prefix (enough to salvage the MSH segment for a NAK) and the caller closes.
//! - The deframer never panics and scans each byte a bounded number of times.

use crate::wipe;

/// Start block.
pub const SB: u8 = 0x0B;
/// End block.
pub const EB: u8 = 0x1C;
/// Carriage return closing the end block.
pub const CR: u8 = 0x0D;
/// MLLP release 2 commit acknowledgement payload.
pub const ACK_BYTE: u8 = 0x06;
/// MLLP release 2 negative commit acknowledgement payload.
pub const NAK_BYTE: u8 = 0x15;

/// The most of an oversized frame kept to salvage its header for a NAK.
const OVERSIZED_PREFIX: usize = 64 * 1024;

/// What the deframer found in the bytes pushed so far.
#[derive(PartialEq, Eq)]
pub enum Event {
    /// A complete frame's payload.
    Frame(Vec<u8>),
    /// A frame grew past the maximum size; `prefix` holds its first bytes.
    Oversized { prefix: Vec<u8>, limit: usize },
}

impl std::fmt::Debug for Event {
    // Payloads carry PHI: show sizes only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Frame(p) => write!(f, "Frame({} bytes)", p.len()),
            Event::Oversized { prefix, limit } => {
                write!(f, "Oversized(prefix {} bytes, limit {limit})", prefix.len())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for a start block; everything else is noise.
    Outside,
    /// Inside a frame; `buf` holds the payload so far.
    Inside,
    /// A frame just ended at `0x1C`; a `0x0D` here belongs to it.
    AfterEnd,
}

/// Incremental MLLP deframer. See the module documentation for its invariants.
pub struct Deframer {
    max_size: usize,
    state: State,
    /// Bytes pushed but not yet examined.
    pending: Vec<u8>,
    /// Read position in `pending`.
    pos: usize,
    /// Payload of the frame being assembled.
    payload: Vec<u8>,
    discarded: u64,
    truncated: u64,
}

/// What it holds is message content (PHI): wiped when the connection ends. Both buffers grow
/// through [`wipe::extend`], so no block they outgrew was freed unwiped.
impl Drop for Deframer {
    fn drop(&mut self) {
        wipe::vec(&mut self.pending);
        wipe::vec(&mut self.payload);
    }
}

impl Deframer {
    /// A deframer refusing payloads larger than `max_size` bytes.
    pub fn new(max_size: usize) -> Self {
        Deframer {
            max_size,
            state: State::Outside,
            pending: Vec::new(),
            pos: 0,
            payload: Vec::new(),
            discarded: 0,
            truncated: 0,
        }
    }

    /// Adds bytes read from the connection.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos >= self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        wipe::extend(&mut self.pending, data, usize::MAX);
    }

    /// Bytes discarded outside frames since the last call (resets the count).
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    /// Frames cut short by a new start block since the last call (resets the count).
    pub fn take_truncated(&mut self) -> u64 {
        std::mem::take(&mut self.truncated)
    }

    /// True while a frame has started and not ended: the connection closed mid-message.
    pub fn in_frame(&self) -> bool {
        self.state == State::Inside
    }

    /// The next event from the bytes pushed so far, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let rest = self.pending.get(self.pos..).unwrap_or(&[]);
            if rest.is_empty() {
                return None;
            }
            match self.state {
                State::AfterEnd => {
                    if rest.first() == Some(&CR) {
                        self.pos += 1;
                    }
                    self.state = State::Outside;
                }
                State::Outside => match rest.iter().position(|&b| b == SB) {
                    Some(i) => {
                        self.discarded += i as u64;
                        self.pos += i + 1;
                        self.state = State::Inside;
                        self.payload.clear();
                    }
                    None => {
                        self.discarded += rest.len() as u64;
                        self.pos += rest.len();
                    }
                },
                State::Inside => {
                    let end = rest.iter().position(|&b| b == EB || b == SB);
                    let take = end.unwrap_or(rest.len());
                    if self.payload.len() + take > self.max_size {
                        return Some(self.oversized());
                    }
                    wipe::extend(&mut self.payload, &rest[..take], self.max_size);
                    self.pos += take;
                    match end.and_then(|i| rest.get(i)) {
                        Some(&EB) => {
                            self.pos += 1;
                            self.state = State::AfterEnd;
                            return Some(Event::Frame(std::mem::take(&mut self.payload)));
                        }
                        Some(_) => {
                            // A start block before the end block: the frame was cut short.
                            self.truncated += 1;
                            self.discarded += self.payload.len() as u64;
                            wipe::vec(&mut self.payload);
                            self.pos += 1;
                        }
                        None => {}
                    }
                }
            }
        }
    }

    /// The prefix is a new block of its own size; the payload's (up to `max_size`) is wiped.
    fn oversized(&mut self) -> Event {
        let rest = self.pending.get(self.pos..).unwrap_or(&[]);
        let kept = self
            .payload
            .get(..OVERSIZED_PREFIX)
            .unwrap_or(&self.payload);
        let from_rest = &rest[..OVERSIZED_PREFIX.saturating_sub(kept.len()).min(rest.len())];
        let mut prefix = Vec::with_capacity(kept.len() + from_rest.len());
        prefix.extend_from_slice(kept);
        prefix.extend_from_slice(from_rest);
        wipe::vec(&mut self.payload);
        // The connection is closed after this; drop everything buffered (wiped with the
        // deframer).
        self.pending.clear();
        self.pos = 0;
        self.state = State::Outside;
        Event::Oversized {
            prefix,
            limit: self.max_size,
        }
    }
}

/// Wraps a payload in an MLLP frame.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(SB);
    out.extend_from_slice(payload);
    out.push(EB);
    out.push(CR);
    out
}

/// The MLLP release 2 commit acknowledgement block.
pub const COMMIT_ACK: [u8; 4] = [SB, ACK_BYTE, EB, CR];
/// The MLLP release 2 negative commit acknowledgement block.
pub const COMMIT_NAK: [u8; 4] = [SB, NAK_BYTE, EB, CR];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frames(d: &mut Deframer) -> Vec<Event> {
        std::iter::from_fn(|| d.next_event()).collect()
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut d = Deframer::new(100);
        let mut bytes = encode(b"MSH|1");
        bytes.extend(encode(b"MSH|2"));
        d.push(&bytes);
        assert_eq!(
            frames(&mut d),
            vec![
                Event::Frame(b"MSH|1".to_vec()),
                Event::Frame(b"MSH|2".to_vec())
            ]
        );
        assert_eq!(d.take_discarded(), 0);
    }

    #[test]
    fn byte_by_byte_and_noise_outside_frames_is_counted() {
        let mut d = Deframer::new(100);
        let mut bytes = b"junk\r\n".to_vec();
        bytes.extend(encode(b"MSH|a"));
        bytes.extend(b"xy");
        bytes.extend(encode(b"MSH|b"));
        let mut got = Vec::new();
        for b in bytes {
            d.push(&[b]);
            got.extend(frames(&mut d));
        }
        assert_eq!(
            got,
            vec![
                Event::Frame(b"MSH|a".to_vec()),
                Event::Frame(b"MSH|b".to_vec())
            ]
        );
        assert_eq!(d.take_discarded(), 8);
        assert!(!d.in_frame());
    }

    #[test]
    fn missing_cr_after_end_block_is_tolerated() {
        let mut d = Deframer::new(100);
        d.push(b"\x0bMSH|1\x1c");
        assert_eq!(frames(&mut d), vec![Event::Frame(b"MSH|1".to_vec())]);
        d.push(b"\x0bMSH|2\x1c\r");
        assert_eq!(frames(&mut d), vec![Event::Frame(b"MSH|2".to_vec())]);
        assert_eq!(d.take_discarded(), 0);
    }

    #[test]
    fn start_block_inside_frame_truncates_it() {
        let mut d = Deframer::new(100);
        d.push(b"\x0bMSH|cut\x0bMSH|ok\x1c\r");
        assert_eq!(frames(&mut d), vec![Event::Frame(b"MSH|ok".to_vec())]);
        assert_eq!(d.take_truncated(), 1);
    }

    #[test]
    fn oversized_frame_reports_a_prefix() {
        let mut d = Deframer::new(10);
        d.push(b"\x0bMSH|0123456789abcdef");
        match frames(&mut d).as_slice() {
            [Event::Oversized { prefix, limit }] => {
                assert!(prefix.starts_with(b"MSH|0123"));
                assert_eq!(*limit, 10);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_frame_read_in_pieces_arrives_whole() {
        let body: Vec<u8> = (0..200 * 1024).map(|i| b"MSH|PID|OBX|"[i % 12]).collect();
        let bytes = encode(&body);
        let mut d = Deframer::new(1024 * 1024);
        let mut got = Vec::new();
        for piece in bytes.chunks(16 * 1024) {
            d.push(piece);
            got.extend(frames(&mut d));
        }
        assert_eq!(got, vec![Event::Frame(body)]);
    }

    #[test]
    fn an_oversized_prefix_is_the_first_64_kib_in_a_block_of_its_own() {
        let body: Vec<u8> = (0..300 * 1024).map(|i| b'A' + (i % 26) as u8).collect();
        let mut d = Deframer::new(200 * 1024);
        let mut got = Vec::new();
        d.push(&[SB]);
        for piece in body.chunks(16 * 1024) {
            d.push(piece);
            got.extend(frames(&mut d));
        }
        match got.as_slice() {
            [Event::Oversized { prefix, limit }] => {
                assert_eq!(prefix.as_slice(), &body[..OVERSIZED_PREFIX]);
                // Not the payload's block cut short: no room holding more of the message.
                assert_eq!(prefix.capacity(), OVERSIZED_PREFIX);
                assert_eq!(*limit, 200 * 1024);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exactly_max_size_is_accepted() {
        let mut d = Deframer::new(5);
        d.push(&encode(b"12345"));
        assert_eq!(frames(&mut d), vec![Event::Frame(b"12345".to_vec())]);
    }

    #[test]
    fn unfinished_frame_is_reported() {
        let mut d = Deframer::new(100);
        d.push(b"\x0bMSH|half");
        assert!(frames(&mut d).is_empty());
        assert!(d.in_frame());
    }

    #[test]
    fn release2_commit_blocks_are_frames() {
        let mut d = Deframer::new(100);
        d.push(&COMMIT_ACK);
        d.push(&COMMIT_NAK);
        assert_eq!(
            frames(&mut d),
            vec![Event::Frame(vec![ACK_BYTE]), Event::Frame(vec![NAK_BYTE])]
        );
    }
}
