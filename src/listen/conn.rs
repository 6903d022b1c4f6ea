//! One MLLP connection: deframe, parse the header, store durably, then acknowledge.
//!
//! Messages on one connection are handled one after the other: the ACK for a message is written
//! only after its commit returned (promise 1), and the next frame is read after that. Bad input
//! gets a NAK, or a closed connection where no NAK can be built (promise 6).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::Shared;
use crate::audit::{Event as AuditEvent, Severity as AuditSeverity};
use crate::config::Unrouted;
use crate::hl7::ack::{self, AckParams, ErrCondition, Outcome, Severity};
use crate::hl7::mllp::{self, Deframer, Event};
use crate::hl7::Message;
use crate::route::RouteInput;
use crate::store::{now_ms, Intake, Meta, StoreError, Stored};
use crate::telemetry::add;

/// Control IDs for the ACKs this engine sends: start time and a counter, 18 characters.
pub struct AckIds {
    start: u32,
    next: AtomicU64,
}

impl Default for AckIds {
    fn default() -> Self {
        AckIds {
            start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0),
            next: AtomicU64::new(1),
        }
    }
}

impl AckIds {
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08X}{:010X}", self.start, n & 0xFF_FFFF_FFFF)
    }
}

/// What to do after answering a frame.
enum Next {
    Continue,
    Close,
}

/// Serves one connection until the peer closes, it idles out, bad framing forces a close, or
/// the engine shuts down.
pub async fn serve<S>(
    mut stream: S,
    peer: String,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let s = &shared.settings;
    let counters = &shared.counters;
    let mut deframer = Deframer::new(s.max_message_size);
    // Holds message content as read (plaintext on `mllp`): wiped when the connection ends.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 16 * 1024]);
    tracing::debug!(listener = %s.name, peer = %peer, "Connection opened.");
    'conn: loop {
        while let Some(event) = deframer.next_event() {
            let (reply, next) = match event {
                Event::Frame(payload) => handle_frame(payload, &peer, shared).await,
                Event::Oversized { prefix, limit } => {
                    // Up to 64 KiB of the message: wiped once the NAK is built.
                    let prefix = zeroize::Zeroizing::new(prefix);
                    add(&counters.frames_oversized, 1);
                    tracing::warn!(listener = %s.name, peer = %peer, limit, "Message larger than max_message_size: rejected, connection closed.");
                    rejected(
                        shared,
                        &peer,
                        None,
                        "AR",
                        &format!("message larger than max_message_size ({limit} bytes)"),
                    );
                    let cond = ErrCondition::new(
                        207,
                        Severity::Error,
                        format!("message exceeds the maximum size of {limit} bytes"),
                    );
                    (reject_reply(&prefix, cond, shared), Next::Close)
                }
            };
            if let Some(reply) = reply {
                // A peer that does not read its ACKs must not hold the connection (and the
                // engine's shutdown) forever.
                let write = async {
                    stream.write_all(&reply).await?;
                    stream.flush().await
                };
                match tokio::time::timeout(s.idle_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break 'conn,
                    Err(_) => {
                        add(&counters.connections_idle_closed, 1);
                        tracing::warn!(listener = %s.name, peer = %peer, idle_timeout = ?s.idle_timeout, "Peer does not read its acknowledgements: connection closed.");
                        break 'conn;
                    }
                }
            }
            if matches!(next, Next::Close) {
                break 'conn;
            }
        }
        let discarded = deframer.take_discarded();
        if discarded > 0 {
            add(&counters.bytes_discarded, discarded);
            tracing::warn!(listener = %s.name, peer = %peer, bytes = discarded, "Bytes outside MLLP frames discarded.");
        }
        let truncated = deframer.take_truncated();
        if truncated > 0 {
            add(&counters.frames_truncated, truncated);
            tracing::warn!(listener = %s.name, peer = %peer, frames = truncated, "Truncated MLLP frame discarded (new start block before the end block).");
        }
        let read = tokio::select! {
            r = tokio::time::timeout(s.idle_timeout, stream.read(&mut buf)) => r,
            _ = shutdown.changed() => break 'conn,
        };
        match read {
            Ok(Ok(0)) => {
                if deframer.in_frame() {
                    add(&counters.frames_truncated, 1);
                    tracing::warn!(listener = %s.name, peer = %peer, "Connection closed inside a frame: partial message discarded, not acknowledged.");
                }
                break;
            }
            Ok(Ok(n)) => deframer.push(&buf[..n]),
            Ok(Err(e)) => {
                tracing::debug!(listener = %s.name, peer = %peer, error = %e, "Read failed.");
                break;
            }
            Err(_) => {
                add(&counters.connections_idle_closed, 1);
                tracing::info!(listener = %s.name, peer = %peer, idle_timeout = ?s.idle_timeout, "Idle connection closed.");
                shared.audit.record(
                    AuditEvent::new("connection.timeout")
                        .listener(s.name.as_str())
                        .actor(peer.as_str())
                        .outcome("closed")
                        .with("reason", "idle"),
                );
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// Audits a message that was not stored: what was answered and why (no content).
fn rejected(shared: &Shared, peer: &str, msg: Option<&Message>, answer: &str, reason: &str) {
    let mut e = AuditEvent::new("message.rejected")
        .severity(AuditSeverity::Warning)
        .listener(shared.settings.name.as_str())
        .actor(peer)
        .outcome(answer)
        .with("reason", reason);
    if let Some(m) = msg {
        let h = m.header();
        e = e.control_id(h.control_id.as_str());
        e.message_type = Some(h.message_type.to_string());
    }
    shared.audit.record(e);
}

/// The MRN: the first PID-3 repetition typed `MR`, else the first one.
fn mrn(msg: &Message) -> Option<zeroize::Zeroizing<String>> {
    let ids = msg.mrns();
    let pick = ids
        .iter()
        .find(|i| i.identifier_type.as_deref() == Some("MR"))
        .or_else(|| ids.first())?;
    Some(zeroize::Zeroizing::new(pick.id.clone()))
}

fn params(shared: &Shared) -> (String, String) {
    (ack::hl7_timestamp(SystemTime::now()), shared.acks.next())
}

/// A reject for a frame that cannot be stored: an AR built from what can be salvaged of its
/// header, or nothing (the caller closes).
fn reject_reply(raw: &[u8], cond: ErrCondition, shared: &Shared) -> Option<Vec<u8>> {
    add(&shared.counters.naks_sent, 1);
    if shared.settings.mllp_release2 {
        return Some(mllp::COMMIT_NAK.to_vec());
    }
    let (ts, id) = params(shared);
    let p = AckParams {
        timestamp: &ts,
        control_id: &id,
    };
    match Message::parse(raw) {
        Ok(msg) => ack::build_ack(&msg, &Outcome::Rejected(cond), &p),
        Err(e) => ack::nak_for_unparsed(raw, &e, &p),
    }
    .map(|a| mllp::encode(&a))
}

async fn handle_frame(payload: Vec<u8>, peer: &str, shared: &Shared) -> (Option<Vec<u8>>, Next) {
    let s = &shared.settings;
    let counters = &shared.counters;
    // Message content: wiped however this ends (the store takes it below).
    let mut payload = zeroize::Zeroizing::new(payload);
    let msg = match Message::parse(&payload) {
        Ok(m) => m,
        Err(e) => {
            add(&counters.messages_rejected, 1);
            tracing::warn!(listener = %s.name, peer = %peer, error = %e, bytes = payload.len(), "Unparseable message rejected.");
            let reply = reject_reply(&payload, ErrCondition::from(&e), shared);
            let next = if reply.is_some() {
                Next::Continue
            } else {
                Next::Close
            };
            if reply.is_none() {
                tracing::warn!(listener = %s.name, peer = %peer, "No acknowledgement can be built; closing the connection.");
            }
            let answer = if reply.is_some() { "AR" } else { "closed" };
            rejected(shared, peer, None, answer, &e.to_string());
            return (reply, next);
        }
    };
    let h = msg.header();
    let meta = Meta {
        listener: s.name.clone(),
        peer: peer.to_string(),
        sending_application: h.sending_application.clone(),
        sending_facility: h.sending_facility.clone(),
        receiving_application: h.receiving_application.clone(),
        receiving_facility: h.receiving_facility.clone(),
        message_type: h.message_type.to_string(),
        control_id: h.control_id.clone(),
        version: h.version.clone(),
        size: payload.len(),
        received_ms: now_ms(),
        mrn_token: None,
        mrn_sealed: None,
        ack: Some(if s.mllp_release2 {
            "0x06".to_string()
        } else {
            ack::ack_code_for(&msg, &Outcome::Accepted)
                .map_or("none".to_string(), |c| c.as_str().to_string())
        }),
    };
    let mrn = mrn(&msg);
    let meta = Meta {
        mrn_token: mrn.as_ref().map(|m| shared.audit_keys.token(m)),
        ..meta
    };
    let control_id = h.control_id.clone();
    let destinations = shared.router.destinations(&RouteInput {
        listener: &s.name,
        message_type: &meta.message_type,
        sending_application: h.namespace(&h.sending_application),
        sending_facility: h.namespace(&h.sending_facility),
    });
    if destinations.is_empty() {
        match shared.unrouted {
            Unrouted::Reject => {
                add(&counters.messages_unrouted, 1);
                tracing::warn!(listener = %s.name, peer = %peer, control_id = %control_id, message_type = %meta.message_type, "No route matches the message: rejected (AR).");
                let cond = ErrCondition::new(
                    207,
                    Severity::Error,
                    format!(
                        "no route accepts message type {} from this sender",
                        meta.message_type
                    ),
                );
                rejected(shared, peer, Some(&msg), "AR", "no route matches");
                return (reject_reply(&payload, cond, shared), Next::Continue);
            }
            Unrouted::Accept => {
                if !shared.router.is_empty() {
                    add(&counters.messages_unrouted, 1);
                    tracing::info!(listener = %s.name, peer = %peer, control_id = %control_id, message_type = %meta.message_type, "No route matches the message: kept as unrouted.");
                }
            }
        }
    }
    let result = shared
        .store
        .submit(Intake {
            meta,
            raw: std::mem::take(&mut *payload),
            destinations,
            mrn,
        })
        .await;
    let outcome = match &result {
        Ok(Stored::New(id)) => {
            add(&counters.messages_accepted, 1);
            tracing::debug!(listener = %s.name, peer = %peer, id, control_id = %control_id, "Message stored.");
            Outcome::Accepted
        }
        Ok(Stored::Duplicate(id)) => {
            add(&counters.messages_duplicate, 1);
            tracing::info!(listener = %s.name, peer = %peer, id, control_id = %control_id, "Duplicate message acknowledged again, not stored twice.");
            shared.audit.record(
                AuditEvent::new("message.duplicate")
                    .listener(s.name.as_str())
                    .actor(peer)
                    .message(*id)
                    .control_id(control_id.as_str())
                    .outcome("acknowledged again, not stored"),
            );
            Outcome::Accepted
        }
        Err(e) => {
            add(&counters.messages_store_failed, 1);
            tracing::error!(listener = %s.name, peer = %peer, control_id = %control_id, error = %e, "Message not stored; answering AE.");
            rejected(shared, peer, Some(&msg), "AE", &store_failure_text(e));
            Outcome::Error(ErrCondition::new(
                207,
                Severity::Error,
                store_failure_text(e),
            ))
        }
    };
    if shared.settings.mllp_release2 {
        return match outcome {
            Outcome::Accepted => {
                add(&counters.acks_sent, 1);
                (Some(mllp::COMMIT_ACK.to_vec()), Next::Continue)
            }
            _ => {
                add(&counters.naks_sent, 1);
                (Some(mllp::COMMIT_NAK.to_vec()), Next::Continue)
            }
        };
    }
    let (ts, id) = params(shared);
    let p = AckParams {
        timestamp: &ts,
        control_id: &id,
    };
    let reply = ack::build_ack(&msg, &outcome, &p);
    if reply.is_some() {
        match outcome {
            Outcome::Accepted => add(&counters.acks_sent, 1),
            _ => add(&counters.naks_sent, 1),
        }
    }
    (reply.map(|a| mllp::encode(&a)), Next::Continue)
}

fn store_failure_text(e: &Arc<StoreError>) -> String {
    match e.as_ref() {
        StoreError::WriterGone => "gateway shutting down; message not stored, send again".into(),
        StoreError::Quota { .. } => {
            "gateway storage is full (quota reached); message not stored, send again later".into()
        }
        _ => "message not stored (storage error); send again later".into(),
    }
}
