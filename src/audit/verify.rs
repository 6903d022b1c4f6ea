//! `hl7edge audit verify`: walks the chain in seq order with the checkpoints beside it and
//! reports the first bad sequence number.
//!
//! What each tampering looks like:
//! - a record modified (content or stored hash): its recomputed hash differs;
//! - a record deleted: a gap in the seqs;
//! - a record inserted or two swapped: a record under a key that is not its own seq, or a hash
//!   that does not chain;
//! - the chain rewritten from some record on with recomputed hashes: the next signed checkpoint
//!   no longer matches (reported at the checkpoint, naming the span since the one before);
//! - the tail truncated: the newest checkpoint names a seq past the last record.
//!
//! Records after the newest checkpoint are chained but not yet signed; the report says how many.

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::{chain_hash, split_stored, Checkpoint, Record};

/// The first thing wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints_verified: u64,
    /// Records after the newest checkpoint: chained, not yet signed.
    pub unsigned_tail: u64,
    pub problem: Option<Problem>,
}

/// Feed records in seq order, with every checkpoint; then `finish`.
pub struct Verifier {
    key: VerifyingKey,
    prev: [u8; 32],
    expected: Option<u64>,
    records: u64,
    first: Option<u64>,
    last_ckpt: u64,
    checkpoints_verified: u64,
    /// Checkpoints not yet reached, ascending.
    pending: std::collections::VecDeque<(u64, Result<Checkpoint, String>)>,
    max_checkpoint: u64,
    /// `through_seq` of every `audit.purged` record seen: a chain that starts after seq 1 must
    /// say so itself, or its prefix was deleted.
    purged_through: std::collections::HashSet<u64>,
    problem: Option<Problem>,
}

impl Verifier {
    pub fn new(key: VerifyingKey) -> Verifier {
        Verifier {
            key,
            prev: [0; 32],
            expected: None,
            records: 0,
            first: None,
            last_ckpt: 0,
            checkpoints_verified: 0,
            pending: Default::default(),
            max_checkpoint: 0,
            purged_through: Default::default(),
            problem: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.problem.is_some()
    }

    fn fail(&mut self, seq: u64, what: String) {
        if self.problem.is_none() {
            self.problem = Some(Problem { seq, what });
        }
    }

    /// Adds checkpoints (raw table values), in ascending seq order, before the records they
    /// cover are fed.
    pub fn add_checkpoint(&mut self, seq: u64, raw: &[u8]) {
        let parsed = serde_json::from_slice::<Checkpoint>(raw)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                if c.seq != seq {
                    Err(format!("stored under seq {seq} but names seq {}", c.seq))
                } else if !c.verify(&self.key) {
                    Err("its signature does not verify with the audit public key".into())
                } else {
                    Ok(c)
                }
            });
        self.max_checkpoint = self.max_checkpoint.max(seq);
        self.pending.push_back((seq, parsed));
    }

    /// The next record in seq order (`raw` is the stored value).
    pub fn add_record(&mut self, seq: u64, raw: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        let expected = match self.expected {
            Some(e) => e,
            None => {
                // The first record: seq 1, or the one after the anchor checkpoint of a purge.
                self.first = Some(seq);
                if seq > 1 {
                    // Checkpoints older than the anchor went with the purged records.
                    while self.pending.front().is_some_and(|(s, _)| *s < seq - 1) {
                        self.pending.pop_front();
                    }
                    match self.pending.front() {
                        Some((a, Ok(cp))) if *a == seq - 1 => {
                            self.prev = cp.hash_bytes().unwrap_or_default();
                            self.last_ckpt = *a;
                            self.checkpoints_verified += 1;
                            self.pending.pop_front();
                        }
                        Some((a, Err(e))) if *a == seq - 1 => {
                            let e = e.clone();
                            self.fail(*a, format!("anchor checkpoint {a}: {e}"));
                            return;
                        }
                        _ => {
                            self.fail(
                                1,
                                format!(
                                    "records 1 to {} are missing (deleted) and no checkpoint \
                                     anchors the chain at {}",
                                    seq - 1,
                                    seq - 1
                                ),
                            );
                            return;
                        }
                    }
                }
                seq
            }
        };
        // Checkpoints below the first record (left from before a purge) are history.
        while self.pending.front().is_some_and(|(s, _)| *s < expected) {
            self.pending.pop_front();
        }
        if seq != expected {
            self.fail(
                expected,
                format!("record {expected} is missing (deleted); the next stored is {seq}"),
            );
            return;
        }
        let Some((stored, canonical)) = split_stored(raw) else {
            self.fail(seq, "shorter than its hash (truncated or modified)".into());
            return;
        };
        match serde_json::from_slice::<Record>(canonical) {
            Ok(r) if r.seq == seq && r.event.event == "audit.purged" => {
                if let Some(t) = r
                    .event
                    .detail
                    .get("through_seq")
                    .and_then(|t| t.parse().ok())
                {
                    self.purged_through.insert(t);
                }
            }
            Ok(r) if r.seq != seq => {
                self.fail(
                    seq,
                    format!(
                        "holds record {} (inserted, moved or reordered records)",
                        r.seq
                    ),
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                self.fail(seq, format!("not a valid record (modified): {e}"));
                return;
            }
        }
        let computed = chain_hash(&self.prev, canonical);
        if computed != stored {
            self.fail(
                seq,
                "its hash does not match its content and the previous record (modified, or a \
                 record before it was replaced)"
                    .into(),
            );
            return;
        }
        self.prev = computed;
        self.records += 1;
        self.expected = Some(seq.saturating_add(1));
        if self.pending.front().is_some_and(|(s, _)| *s == seq) {
            if let Some((_, cp)) = self.pending.pop_front() {
                match cp {
                    Ok(cp) if cp.hash_bytes() == Some(computed) => {
                        self.checkpoints_verified += 1;
                        self.last_ckpt = seq;
                    }
                    Ok(_) => {
                        let since = self.last_ckpt + 1;
                        self.fail(
                            seq,
                            format!(
                                "the chain differs from the signed checkpoint at {seq}: records \
                                 {since} to {seq} were rewritten"
                            ),
                        );
                    }
                    Err(e) => self.fail(seq, format!("checkpoint {seq}: {e}")),
                }
            }
        }
    }

    pub fn finish(mut self) -> VerifyReport {
        let last = self.expected.map(|e| e - 1);
        if self.problem.is_none() {
            if let Some(first) = self.first.filter(|f| *f > 1) {
                if !self.purged_through.contains(&(first - 1)) {
                    self.fail(
                        1,
                        format!(
                            "records 1 to {} are missing and no audit.purged record says \
                             retention deleted them (a deleted prefix)",
                            first - 1
                        ),
                    );
                }
            }
        }
        if self.problem.is_none() {
            let end = last.unwrap_or(0);
            if self.max_checkpoint > end {
                self.fail(
                    end + 1,
                    format!(
                        "records {} to {} are missing: the chain was truncated (a signed \
                         checkpoint covers {})",
                        end + 1,
                        self.max_checkpoint,
                        self.max_checkpoint
                    ),
                );
            }
        }
        VerifyReport {
            records: self.records,
            first_seq: self.first,
            last_seq: last,
            checkpoints_verified: self.checkpoints_verified,
            unsigned_tail: last.map_or(0, |l| l.saturating_sub(self.last_ckpt)),
            problem: self.problem,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::{AuditKeys, Event, RECORD_VERSION};

    type Rows = Vec<(u64, Vec<u8>)>;

    /// A chain of `n` records with a checkpoint every `every`.
    fn chain(n: u64, every: u64, keys: &AuditKeys) -> (Rows, Rows) {
        let mut prev = [0u8; 32];
        let mut recs = Vec::new();
        let mut cps = Vec::new();
        for seq in 1..=n {
            let r = Record {
                v: RECORD_VERSION,
                seq,
                event: if seq == 15 {
                    // What retention leaves after deleting records 1 to 10.
                    Event {
                        time_ms: seq,
                        event: "audit.purged".into(),
                        ..Event::default()
                    }
                    .with("through_seq", 10)
                } else {
                    Event {
                        time_ms: seq,
                        event: "test.event".into(),
                        ..Event::default()
                    }
                },
            };
            let c = r.canonical();
            let h = chain_hash(&prev, &c);
            let mut raw = h.to_vec();
            raw.extend_from_slice(&c);
            recs.push((seq, raw));
            prev = h;
            if seq % every == 0 {
                let cp = keys.checkpoint(seq, &h, seq);
                cps.push((seq, serde_json::to_vec(&cp).unwrap()));
            }
        }
        (recs, cps)
    }

    fn run(keys: &AuditKeys, recs: &[(u64, Vec<u8>)], cps: &[(u64, Vec<u8>)]) -> VerifyReport {
        let mut v = Verifier::new(keys.verifying_key());
        for (s, c) in cps {
            v.add_checkpoint(*s, c);
        }
        for (s, r) in recs {
            v.add_record(*s, r);
        }
        v.finish()
    }

    fn keys() -> AuditKeys {
        AuditKeys::derive(&crate::keys::Key::from_bytes([7; 32]))
    }

    #[test]
    fn untouched_chain_verifies() {
        let k = keys();
        let (r, c) = chain(25, 10, &k);
        let rep = run(&k, &r, &c);
        assert_eq!(rep.problem, None);
        assert_eq!(rep.records, 25);
        assert_eq!(rep.checkpoints_verified, 2);
        assert_eq!(rep.unsigned_tail, 5);
    }

    #[test]
    fn each_tampering_names_its_seq() {
        let k = keys();
        let (r, c) = chain(25, 10, &k);
        // Modified content.
        let mut m = r.clone();
        let last = m[6].1.len() - 3;
        m[6].1[last] ^= 1;
        assert_eq!(run(&k, &m, &c).problem.unwrap().seq, 7);
        // Deleted.
        let mut d = r.clone();
        d.remove(11);
        assert_eq!(run(&k, &d, &c).problem.unwrap().seq, 12);
        // Swapped.
        let mut s = r.clone();
        let (a, b) = (s[3].1.clone(), s[8].1.clone());
        s[3].1 = b;
        s[8].1 = a;
        assert_eq!(run(&k, &s, &c).problem.unwrap().seq, 4);
        // Truncated after a checkpoint.
        let t: Vec<_> = r[..22].to_vec();
        let ok = run(&k, &t, &c);
        assert_eq!(
            ok.problem, None,
            "a tail past the newest checkpoint is unsigned"
        );
        assert_eq!(ok.unsigned_tail, 2);
        let t: Vec<_> = r[..15].to_vec();
        assert_eq!(run(&k, &t, &c).problem.unwrap().seq, 16);
        // Rewritten with recomputed hashes: caught by the checkpoint.
        let mut forged = chain(25, 100, &k).0;
        let mut prev = [0u8; 32];
        for (seq, raw) in forged.iter_mut() {
            let mut rec: Record = serde_json::from_slice(&raw[32..]).unwrap();
            if *seq == 13 {
                rec.event.event = "forged".into();
            }
            let c = rec.canonical();
            let h = chain_hash(&prev, &c);
            *raw = h.to_vec();
            raw.extend_from_slice(&c);
            prev = h;
        }
        let p = run(&k, &forged, &c).problem.unwrap();
        assert_eq!(p.seq, 20);
        assert!(p.what.contains("11 to 20"), "{}", p.what);
        // A forged checkpoint signature.
        let other = AuditKeys::derive(&crate::keys::Key::from_bytes([8; 32]));
        let (_, bad) = chain(25, 10, &other);
        assert_eq!(run(&k, &r, &bad).problem.unwrap().seq, 10);
    }

    #[test]
    fn a_purged_prefix_verifies_from_its_anchor() {
        let k = keys();
        let (r, c) = chain(25, 10, &k);
        let rest: Vec<_> = r[10..].to_vec();
        let anchor: Vec<_> = c[..].to_vec();
        let rep = run(&k, &rest, &anchor);
        assert_eq!(rep.problem, None, "{rep:?}");
        assert_eq!(rep.first_seq, Some(11));
        // Without the anchor, the missing prefix is reported from seq 1.
        let rep = run(&k, &rest, &c[1..]);
        assert_eq!(rep.problem.unwrap().seq, 1);
        // A prefix deleted up to a checkpoint, with no retention record saying so.
        let rest: Vec<_> = r[20..].to_vec();
        let p = run(&k, &rest, &c).problem.unwrap();
        assert_eq!(p.seq, 1);
        assert!(p.what.contains("deleted prefix"), "{}", p.what);
    }
}
