//! `hl7edge audit verify|export|search|public-key`, and the audit of other commands.
//!
//! The records are read from the running engine over its control socket, a page at a time, or
//! from the store when the engine is stopped; either way memory stays bounded however long the
//! trail is. Verification needs the checkpoint public key: derived from the sealed audit key,
//! or given with `--public-key` by an auditor who does not hold the TPM.

use std::collections::HashSet;
use std::io::Write;

use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::{split_stored, Event, Record, Verifier, VerifyReport};
use crate::config::Settings;
use crate::control::{self, Answer, Request};
use crate::store::{Store, StoreReader};

const PAGE: usize = 2000;

/// Where the records come from.
pub enum Source {
    Engine(std::path::PathBuf),
    Store(StoreReader),
}

impl Source {
    /// The running engine when its control socket answers, else the store itself.
    pub fn open(settings: &Settings) -> Result<Source, String> {
        let probe = Request::AuditPage { after: 0, limit: 0 };
        match control::request(&settings.control_socket, &probe)? {
            Some(_) => Ok(Source::Engine(settings.control_socket.clone())),
            None => Store::open(&settings.store)
                .map(|s| Source::Store(s.reader()))
                .map_err(|e| e.to_string()),
        }
    }

    fn rows(&self, req: Request) -> Result<Vec<(u64, Vec<u8>)>, String> {
        match self {
            Source::Store(r) => match req {
                Request::AuditPage { after, limit } => r.audit_page(after, limit),
                Request::AuditCheckpoints { from, limit } => r.audit_checkpoints(from, limit),
                _ => return Err("not an audit read".into()),
            }
            .map_err(|e| e.to_string()),
            Source::Engine(path) => match control::request(path, &req)? {
                Some(Answer::AuditRows { rows }) => rows
                    .into_iter()
                    .map(|(k, v)| {
                        base64::engine::general_purpose::STANDARD
                            .decode(v)
                            .map(|v| (k, v))
                            .map_err(|e| format!("unreadable answer from the engine: {e}"))
                    })
                    .collect(),
                Some(Answer::Error { message }) => Err(message),
                Some(_) => Err("unexpected answer from the engine".into()),
                None => Err("the engine stopped while reading".into()),
            },
        }
    }

    pub fn page(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
        self.rows(Request::AuditPage { after, limit: PAGE })
    }

    pub fn checkpoints(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
        self.rows(Request::AuditCheckpoints { from, limit: PAGE })
    }
}

/// Records the event of a command (an operator's action) in the audit trail: through the
/// running engine's control socket, or straight into the store when the engine is stopped.
pub fn record(settings: &Settings, event: Event) -> Result<(), String> {
    let req = Request::AuditRecord(Box::new(event.clone()));
    match control::request(&settings.control_socket, &req)? {
        Some(Answer::Recorded) => Ok(()),
        Some(Answer::Error { message }) => Err(message),
        Some(_) => Err("unexpected answer from the engine".into()),
        // Never create a store for this: `keys unseal-disk` runs at boot before the data
        // partition that holds it is open, and `keys init` at provisioning before it exists.
        None if !settings.store.path.exists() => {
            tracing::warn!(audit_event = %event.event, actor = event.actor.as_deref(),
                "Not in the audit trail: there is no store yet.");
            Err(format!(
                "not recorded: the store {} does not exist yet",
                settings.store.path.display()
            ))
        }
        None => Store::open(&settings.store)
            .map_err(|e| e.to_string())?
            .record_events(vec![event], Some(&settings.audit.alerts))
            .map_err(|e| e.to_string()),
    }
}

/// Records `event` after a read: drops the source first, since a store it opened holds
/// redb's file lock.
pub fn finish_with(settings: &Settings, src: Source, event: Event) -> Result<(), String> {
    drop(src);
    record(settings, event)
}

/// The actor of a local command: its real uid.
pub fn local_actor() -> String {
    format!("uid:{}", nix::unistd::getuid().as_raw())
}

/// Walks the chain with its checkpoints. Beside a running engine the chain grows while it is
/// read: the walk is bounded by the newest checkpoint when it starts (records after it are the
/// unsigned tail), so it ends, and a checkpoint signed meanwhile is not taken for truncation.
pub fn verify(src: &Source, key: VerifyingKey) -> Result<VerifyReport, String> {
    let mut checkpoint_end = 0u64;
    let mut from = 0u64;
    loop {
        let cps = src.checkpoints(from)?;
        let Some(&(last, _)) = cps.last() else {
            break;
        };
        checkpoint_end = last;
        from = last.saturating_add(1);
        if cps.len() < PAGE {
            break;
        }
    }
    let mut v = Verifier::new(key);
    let mut after = 0u64;
    let mut next_ckpt = 0u64;
    let feed_checkpoints = |v: &mut Verifier, upto: u64, next: &mut u64| loop {
        let cps = src.checkpoints(*next)?;
        let full = cps.len() == PAGE;
        let mut passed = false;
        for (seq, raw) in cps {
            if seq > upto.min(checkpoint_end) {
                passed = true;
                break;
            }
            v.add_checkpoint(seq, &raw);
            *next = seq.saturating_add(1);
        }
        if passed || !full {
            return Ok::<(), String>(());
        }
    };
    loop {
        let rows = src.page(after)?;
        let Some(&(hi, _)) = rows.last() else {
            break;
        };
        feed_checkpoints(&mut v, hi, &mut next_ckpt)?;
        for (seq, raw) in &rows {
            v.add_record(*seq, raw);
        }
        after = hi;
        if v.failed() || (checkpoint_end > 0 && hi >= checkpoint_end) {
            break;
        }
    }
    feed_checkpoints(&mut v, u64::MAX, &mut next_ckpt)?;
    Ok(v.finish())
}

/// What `export` and `search` select.
#[derive(Debug, Default)]
pub struct Filter {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// The MRN's token; records of the patient's messages follow it by message id.
    pub mrn_token: Option<String>,
    pub control_id: Option<String>,
    /// Event type prefix (`message.`, `auth.failed`).
    pub event: Option<String>,
}

/// A record as exported: the stored record without the sealed MRN, and its chain hash.
#[derive(Debug, Serialize)]
pub struct Exported {
    #[serde(flatten)]
    pub record: Record,
    pub hash: String,
}

/// Calls `f` with each selected record, in seq order; returns how many.
pub fn select(
    src: &Source,
    filter: &Filter,
    mut f: impl FnMut(Exported) -> Result<(), String>,
) -> Result<u64, String> {
    let mut after = 0u64;
    let mut count = 0u64;
    // Message ids of the patient's messages (and of the control ID's), so their forwarding
    // records follow.
    let mut ids: HashSet<u64> = HashSet::new();
    loop {
        let rows = src.page(after)?;
        let Some(&(hi, _)) = rows.last() else {
            break;
        };
        for (seq, raw) in rows {
            let Some((hash, canonical)) = split_stored(&raw) else {
                return Err(format!(
                    "audit record {seq} is unreadable: run `hl7edge audit verify`"
                ));
            };
            let mut r: Record = serde_json::from_slice(canonical).map_err(|e| {
                format!("audit record {seq} is unreadable ({e}): run `hl7edge audit verify`")
            })?;
            let e = &r.event;
            if filter.since_ms.is_some_and(|t| e.time_ms < t)
                || filter.until_ms.is_some_and(|t| e.time_ms > t)
                || filter
                    .event
                    .as_deref()
                    .is_some_and(|p| !e.event.starts_with(p))
            {
                continue;
            }
            let keyed = filter.mrn_token.is_some() || filter.control_id.is_some();
            if keyed {
                let direct = filter
                    .mrn_token
                    .as_deref()
                    .is_some_and(|t| e.mrn_token.as_deref() == Some(t))
                    || filter
                        .control_id
                        .as_deref()
                        .is_some_and(|c| e.control_id.as_deref() == Some(c));
                let both = filter.mrn_token.is_some() && filter.control_id.is_some();
                let direct = if both {
                    e.mrn_token.as_deref() == filter.mrn_token.as_deref()
                        && e.control_id.as_deref() == filter.control_id.as_deref()
                } else {
                    direct
                };
                let follows = e.message_id.is_some_and(|m| ids.contains(&m));
                if direct {
                    if let Some(m) = e.message_id {
                        ids.insert(m);
                    }
                } else if !follows {
                    continue;
                }
            }
            r.event.mrn_sealed = None;
            f(Exported {
                record: r,
                hash: hex::encode(hash),
            })?;
            count += 1;
        }
        after = hi;
    }
    Ok(count)
}

/// Writes the selected records as JSON lines.
pub fn export(src: &Source, filter: &Filter, out: &mut impl Write) -> Result<u64, String> {
    select(src, filter, |r| {
        let mut line = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
        line.push(b'\n');
        out.write_all(&line).map_err(|e| e.to_string())
    })
}

/// UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A table for incident response: which messages went where, and what happened to them.
pub fn search(src: &Source, filter: &Filter, out: &mut impl Write) -> Result<u64, String> {
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:<26} {:>8} {:<20} {:<16} {:<14} outcome",
        "time (UTC)", "seq", "event", "message", "control id", "type", "destination"
    );
    select(src, filter, |x| {
        let e = &x.record.event;
        writeln!(
            out,
            "{:<24} {:>7} {:<26} {:>8} {:<20} {:<16} {:<14} {}",
            format_ms(e.time_ms),
            x.record.seq,
            e.event,
            e.message_id.map_or("-".into(), |m| m.to_string()),
            e.control_id.as_deref().unwrap_or("-"),
            e.message_type.as_deref().unwrap_or("-"),
            e.destination.as_deref().unwrap_or("-"),
            e.outcome.as_deref().unwrap_or("-"),
        )
        .map_err(|e| e.to_string())
    })
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-12-04T10:00:00Z`, `2026-12-04 10:00:00`) or a
/// duration before now (`2h`, `7days`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| e.to_string());
    }
    match humantime::parse_duration(text) {
        Ok(d) => Ok(crate::store::now_ms().saturating_sub(d.as_millis() as u64)),
        Err(_) => Err(format!(
            "{text:?} is neither a time (2026-12-04T10:00:00Z) nor a duration before now (2h)"
        )),
    }
}

/// The human report of a verification.
pub fn render_report(r: &VerifyReport) -> String {
    let mut out = String::new();
    match &r.problem {
        None => out.push_str(&format!(
            "audit chain OK: {} records (seq {} to {}), {} signed checkpoints verified",
            r.records,
            r.first_seq.map_or("-".into(), |s| s.to_string()),
            r.last_seq.map_or("-".into(), |s| s.to_string()),
            r.checkpoints_verified
        )),
        Some(p) => out.push_str(&format!(
            "audit chain BROKEN at sequence {}: {} ({} records verified before it)",
            p.seq, p.what, r.records
        )),
    }
    if r.problem.is_none() && r.unsigned_tail > 0 {
        out.push_str(&format!(
            "; the last {} records are chained but not yet covered by a signed checkpoint",
            r.unsigned_tail
        ));
    }
    out
}
