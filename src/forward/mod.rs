//! Forwarders: one task per destination drains its queue, strictly in order, one message in
//! flight (promise 2).
//!
//! A forwarder reads its queue from redb in small batches after a cursor, so a backlog of any
//! size costs the memory of one batch. It sends the head message and waits for the ACK; only an
//! AA/CA whose MSA-2 echoes the sent MSH-10 delivers it. AE/CE, a wrong or unreadable answer and
//! an ACK timeout are failed attempts: retried with exponential backoff and jitter, and after
//! `max_attempts` (or `max_age`) the message is poison: dead-lettered so the queue goes on, or
//! retried forever with `on_poison = "block"`. AR/CR dead-letters at once (`on_reject`).
//! Connection failures (refused, TLS, timeout on connect or write) are not the message's fault:
//! they retry with backoff without counting an attempt.
//!
//! A kept-open connection may have been closed by the destination since its last answer (hl7apy's
//! MLLPServer, for one, closes after every reply). When a connection that already carried an
//! answered exchange ends without answering the next message, that message is sent again at
//! once on a fresh connection, without counting an attempt; only a fresh connection's failure
//! counts against the message.
//!
//! Outcomes go to the store's applier; one lost in a crash means the message is sent again,
//! which at-least-once delivery allows.

pub mod tls;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::audit::{Event, Severity};
use crate::client::{ClientError, MllpClient};
use crate::config::{Backoff, DestinationSettings, OnPoison, OnReject};
use crate::hl7::ack::{ack_info, AckCode};
use crate::hl7::Message;
use crate::store::{now_ms, DeadLetter, Outcomes, Queued, StoreReader};
use tls::Upstream;

/// Entries read from redb at a time.
const BATCH: usize = 64;
/// Largest ACK accepted from a destination.
const MAX_ACK: usize = 64 * 1024;

/// A destination's live figures, for `queue status` and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DestStatus {
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// `idle`, `connecting`, `connected`, `down`, `retrying`, `blocked`.
    pub state: String,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

pub type SharedStatus = Arc<Mutex<DestStatus>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut DestStatus)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type Conn = MllpClient<Box<dyn Stream>>;

/// Why one exchange failed.
enum Failure {
    /// Nothing reached the peer (connect, TLS, pin, write): retry, no attempt counted.
    Connection(String),
    /// The message was sent and not properly answered: a failed attempt.
    Attempt {
        reason: String,
        ack: Option<AckCode>,
        err_code: Option<u16>,
    },
    /// The destination refused the message (AR/CR).
    Rejected { ack: AckCode, err_code: Option<u16> },
    /// The connection ended (closed or reset) after the message was written, with no answer.
    /// On a reused connection this is most likely a stale connection the peer had closed.
    Dropped(String),
}

pub struct Forwarder {
    pub dest: DestinationSettings,
    /// Replaced by a reload; each new connection takes the current one.
    pub tls: Option<crate::reload::Swappable<Upstream>>,
    pub reader: StoreReader,
    pub outcomes: Outcomes,
    pub audit: crate::store::AuditSink,
    pub wake: Arc<Notify>,
    pub status: SharedStatus,
}

impl Forwarder {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.dest.name.clone();
        let mut cursor = 0u64;
        let mut batch: VecDeque<Queued> = VecDeque::new();
        let mut conn: Option<Conn> = None;
        // The TLS configuration the open connection was made with.
        let mut conn_tls: Option<Arc<Upstream>> = None;
        let mut conn_failures = 0u32;
        // Whether the open connection already carried an answered exchange.
        let mut reused = false;
        update(&self.status, |s| s.state = "idle".into());
        loop {
            if *shutdown.borrow() {
                break;
            }
            if batch.is_empty() {
                let reader = self.reader.clone();
                let d = name.clone();
                let read =
                    tokio::task::spawn_blocking(move || reader.queue_batch(&d, cursor, BATCH))
                        .await;
                match read {
                    Ok(Ok(b)) => batch = b.into(),
                    Ok(Err(e)) => {
                        tracing::error!(destination = %name, error = %e, "Cannot read the queue; retrying.");
                        if pause(Duration::from_secs(1), &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                    Err(_) => break,
                }
                if batch.is_empty() {
                    update(&self.status, |s| {
                        if s.state != "down" {
                            s.state = if conn.is_some() { "connected" } else { "idle" }.into();
                        }
                    });
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.changed() => break,
                    }
                    continue;
                }
            }
            let Some(head) = batch.front_mut() else {
                continue;
            };
            let body = match &head.body {
                Ok(b) => b.clone(),
                Err(reason) => {
                    tracing::error!(destination = %name, message_id = head.message_id, reason = %reason, "Queued message cannot be read; dead-lettered.");
                    let letter = self.letter(head, format!("unreadable: {reason}"), None, None);
                    self.outcomes.dead(&name, head.seq, letter);
                    update(&self.status, |s| s.dead_lettered += 1);
                    cursor = head.seq;
                    batch.pop_front();
                    continue;
                }
            };
            // After a reload, the next message goes on a connection made with the new files
            // (a kept-open connection could otherwise trust a retired CA for days).
            if let (Some(_), Some(used), Some(t)) = (&conn, &conn_tls, &self.tls) {
                if !Arc::ptr_eq(used, &t.current()) {
                    tracing::info!(destination = %name, "TLS configuration reloaded; reconnecting.");
                    conn = None;
                }
            }
            if conn.is_none() {
                update(&self.status, |s| s.state = "connecting".into());
                let tls = self.tls.as_ref().map(|t| t.current());
                match self.connect(tls.clone()).await {
                    Ok(c) => {
                        tracing::info!(destination = %name, "Connected.");
                        conn = Some(c);
                        conn_tls = tls;
                        reused = false;
                        conn_failures = 0;
                        update(&self.status, |s| s.state = "connected".into());
                    }
                    Err(reason) => {
                        conn_failures = conn_failures.saturating_add(1);
                        let delay = backoff_delay(&self.dest.backoff, conn_failures);
                        tracing::warn!(destination = %name, error = %reason, retry_in = ?delay, "Cannot connect to the destination.");
                        self.audit_connection(&reason);
                        self.failed(&reason, "down");
                        if pause(delay, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            let result = tokio::select! {
                r = exchange(c, &body, &head.control_id, &self.dest) => r,
                _ = shutdown.changed() => break,
            };
            drop(body);
            let result = match result {
                Err(Failure::Connection(reason) | Failure::Dropped(reason)) if reused => {
                    // Stale kept-open connection: not the message's fault, and nothing to wait
                    // for. Send it again at once on a new connection (which is not reused, so a
                    // second failure takes the normal path).
                    tracing::debug!(destination = %name, error = %reason, "Kept-open connection was closed by the destination; reconnecting.");
                    conn = None;
                    continue;
                }
                Err(Failure::Dropped(reason)) => Err(attempt(&reason)),
                other => other,
            };
            // Any answer, even a negative one, shows the connection works.
            reused = !matches!(result, Err(Failure::Connection(_)));
            match result {
                Ok(()) => {
                    self.outcomes.delivered(&name, head.seq);
                    self.audit.record(
                        Event::new("forward.delivered")
                            .destination(name.as_str())
                            .message(head.message_id)
                            .control_id(head.control_id.as_str())
                            .outcome("accepted")
                            .with("attempt", head.attempts + 1),
                    );
                    update(&self.status, |s| {
                        s.delivered += 1;
                        s.state = "connected".into();
                    });
                    tracing::debug!(destination = %name, message_id = head.message_id, "Delivered.");
                    cursor = head.seq;
                    batch.pop_front();
                }
                Err(Failure::Connection(reason)) => {
                    conn = None;
                    conn_failures = conn_failures.saturating_add(1);
                    let delay = backoff_delay(&self.dest.backoff, conn_failures);
                    tracing::warn!(destination = %name, error = %reason, retry_in = ?delay, "Sending failed; reconnecting.");
                    self.audit_connection(&reason);
                    self.failed(&reason, "down");
                    if pause(delay, &mut shutdown).await {
                        break;
                    }
                }
                Err(Failure::Rejected { ack, err_code })
                    if self.dest.on_reject == OnReject::DeadLetter =>
                {
                    let reason = format!("rejected by the destination ({})", ack.as_str());
                    tracing::warn!(destination = %name, message_id = head.message_id, ack = ack.as_str(), "Message rejected; moved to dead letters.");
                    head.attempts += 1;
                    self.audit_attempt(head, ack.as_str(), &reason);
                    let letter = self.letter(head, reason.clone(), Some(ack), err_code);
                    self.outcomes.dead(&name, head.seq, letter);
                    update(&self.status, |s| {
                        s.dead_lettered += 1;
                        s.last_error = Some(reason);
                        s.last_error_ms = Some(now_ms());
                    });
                    cursor = head.seq;
                    batch.pop_front();
                }
                Err(failure) => {
                    let (reason, ack, err_code, keep_conn) = match failure {
                        Failure::Attempt {
                            reason,
                            ack,
                            err_code,
                        } => {
                            // A wrong or missing answer leaves the stream out of step.
                            let keep = matches!(ack, Some(AckCode::AE | AckCode::CE));
                            (reason, ack, err_code, keep)
                        }
                        Failure::Rejected { ack, err_code } => (
                            format!("rejected by the destination ({})", ack.as_str()),
                            Some(ack),
                            err_code,
                            true,
                        ),
                        Failure::Connection(reason) | Failure::Dropped(reason) => {
                            (reason, None, None, false)
                        }
                    };
                    if !keep_conn {
                        conn = None;
                    }
                    head.attempts += 1;
                    let attempts = head.attempts;
                    self.audit_attempt(head, ack.map_or("no answer", |a| a.as_str()), &reason);
                    let too_old = self.dest.max_age.is_some_and(|age| {
                        now_ms().saturating_sub(head.queued_ms) > age.as_millis() as u64
                    });
                    let poison = attempts >= self.dest.max_attempts || too_old;
                    if poison && self.dest.on_poison == OnPoison::DeadLetter {
                        let why = if too_old {
                            format!("poison: older than max_age after {attempts} attempts; last: {reason}")
                        } else {
                            format!("poison: {attempts} attempts; last: {reason}")
                        };
                        tracing::warn!(destination = %name, message_id = head.message_id, attempts, "Poison message moved to dead letters; the queue goes on.");
                        let letter = self.letter(head, why.clone(), ack, err_code);
                        self.outcomes.dead(&name, head.seq, letter);
                        update(&self.status, |s| {
                            s.dead_lettered += 1;
                            s.last_error = Some(why);
                            s.last_error_ms = Some(now_ms());
                        });
                        cursor = head.seq;
                        batch.pop_front();
                        continue;
                    }
                    self.outcomes.attempted(&name, head.seq, attempts);
                    let delay = backoff_delay(&self.dest.backoff, attempts);
                    let state = if poison { "blocked" } else { "retrying" };
                    tracing::warn!(destination = %name, message_id = head.message_id, attempts, error = %reason, retry_in = ?delay, state, "Delivery attempt failed.");
                    update(&self.status, |s| s.retried += 1);
                    self.failed(&reason, state);
                    if pause(delay, &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        tracing::debug!(destination = %name, "Forwarder stopped.");
    }

    /// A NAK or a missing answer: the attempt, its answer and the reason (codes, no content).
    fn audit_attempt(&self, head: &Queued, answer: &str, reason: &str) {
        self.audit.record(
            Event::new("forward.failed")
                .severity(Severity::Warning)
                .destination(self.dest.name.as_str())
                .message(head.message_id)
                .control_id(head.control_id.as_str())
                .outcome(answer)
                .with("attempt", head.attempts)
                .with("reason", reason),
        );
    }

    fn audit_connection(&self, reason: &str) {
        self.audit.record(
            Event::new("forward.connection_failed")
                .severity(Severity::Warning)
                .destination(self.dest.name.as_str())
                .outcome("retrying")
                .with("reason", reason),
        );
    }

    fn failed(&self, reason: &str, state: &str) {
        update(&self.status, |s| {
            s.state = state.into();
            s.last_error = Some(reason.to_string());
            s.last_error_ms = Some(now_ms());
        });
    }

    fn letter(
        &self,
        q: &Queued,
        reason: String,
        ack: Option<AckCode>,
        err_code: Option<u16>,
    ) -> DeadLetter {
        DeadLetter {
            message_id: q.message_id,
            reason,
            attempts: q.attempts,
            last_ack: ack.map(|a| a.as_str().to_string()),
            last_error_code: err_code,
            queued_ms: q.queued_ms,
            dead_ms: now_ms(),
        }
    }

    /// Connects, over TLS with `tls` when the destination is `mllps`.
    async fn connect(&self, tls: Option<Arc<Upstream>>) -> Result<Conn, String> {
        let d = &self.dest;
        let target = format!("{}:{}", d.host, d.port);
        let tcp = tokio::time::timeout(d.connect_timeout, connect_tcp(d))
            .await
            .map_err(|_| {
                format!(
                    "connect to {target} timed out after {:?}",
                    d.connect_timeout
                )
            })?
            .map_err(|e| format!("connect to {target}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match tls {
            None => Box::new(tcp),
            Some(up) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(&up.config));
                let tickets_before = up.watch.begin();
                let mut tls = tokio::time::timeout(
                    d.connect_timeout,
                    connector.connect(up.server_name.clone(), tcp),
                )
                .await
                .map_err(|_| format!("TLS handshake with {target} timed out"))?
                .map_err(|e| format!("TLS handshake with {target} failed: {e}"))?;
                tls::check_pin(&up.pins, tls.get_ref().1.peer_certificates())?;
                let tls13 =
                    tls.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
                if tls13 && up.watch.cert_requested() {
                    tls::confirm_accepted(&mut tls, &up.watch, tickets_before)
                        .await
                        .map_err(|e| {
                            let ours = if up.watch.has_cert() {
                                "our client certificate (client_cert)"
                            } else {
                                "a client without a certificate (no client_cert is configured)"
                            };
                            format!(
                                "TLS with {target}: the destination asked for a client certificate \
                                 and closed the connection after the handshake: it refused {ours}: {e}"
                            )
                        })?;
                }
                Box::new(tls)
            }
        };
        Ok(MllpClient::with_limit(stream, MAX_ACK))
    }
}

/// Resolves the destination and connects, through its interface when it names one.
async fn connect_tcp(d: &DestinationSettings) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((d.host.as_str(), d.port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ifname) = &d.interface {
            socket.bind_device(Some(ifname.as_bytes()))?;
        }
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the name resolved to no address")))
}

/// Sends one message and classifies the answer.
async fn exchange(
    conn: &mut Conn,
    body: &[u8],
    control_id: &str,
    d: &DestinationSettings,
) -> Result<(), Failure> {
    match tokio::time::timeout(d.write_timeout, conn.send(body)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failure::Connection(format!("write failed: {e}"))),
        Err(_) => {
            return Err(Failure::Connection(format!(
                "write timed out after {:?}",
                d.write_timeout
            )))
        }
    }
    let answer = match tokio::time::timeout(d.ack_timeout, conn.receive()).await {
        Ok(Ok(a)) => a,
        Ok(Err(ClientError::Closed)) => {
            return Err(Failure::Dropped(
                "the destination closed the connection without an ACK".into(),
            ))
        }
        Ok(Err(e @ ClientError::Io(_))) => {
            return Err(Failure::Dropped(format!("reading the ACK failed: {e}")))
        }
        Ok(Err(e)) => return Err(attempt(&format!("reading the ACK failed: {e}"))),
        Err(_) => {
            return Err(attempt(&format!(
                "no ACK within ack_timeout ({:?})",
                d.ack_timeout
            )))
        }
    };
    classify(&answer, control_id)
}

fn attempt(reason: &str) -> Failure {
    Failure::Attempt {
        reason: reason.to_string(),
        ack: None,
        err_code: None,
    }
}

/// What an answer means for the message whose MSH-10 is `control_id`.
fn classify(answer: &[u8], control_id: &str) -> Result<(), Failure> {
    // MLLP release 2 commit blocks.
    match answer {
        [0x06] => return Ok(()),
        [0x15] => {
            return Err(Failure::Attempt {
                reason: "negative commit acknowledgement (MLLP NAK block)".into(),
                ack: None,
                err_code: None,
            })
        }
        _ => {}
    }
    let Ok(msg) = Message::parse(answer) else {
        return Err(attempt("the answer is not an HL7 message"));
    };
    let Some(info) = ack_info(&msg) else {
        return Err(attempt("the answer has no MSA segment with a valid MSA-1"));
    };
    if info.control_id != control_id {
        // A destination that answers with the wrong MSA-2 may have put anything there (an
        // accession number, an MRN): the reason, which reaches logs, the audit, dead letters
        // and `queue status`, names only its length.
        return Err(attempt(&format!(
            "the ACK's MSA-2 ({} characters) does not match the sent MSH-10 {control_id:?}",
            info.control_id.chars().count()
        )));
    }
    match info.code {
        AckCode::AA | AckCode::CA => Ok(()),
        AckCode::AR | AckCode::CR => Err(Failure::Rejected {
            ack: info.code,
            err_code: info.err_code,
        }),
        code @ (AckCode::AE | AckCode::CE) => Err(Failure::Attempt {
            reason: format!(
                "the destination answered {}{}",
                code.as_str(),
                info.err_code
                    .map(|c| format!(" (error {c})"))
                    .unwrap_or_default()
            ),
            ack: Some(code),
            err_code: info.err_code,
        }),
    }
}

/// `initial * multiplier^(n-1)`, at most `max`, then "equal jitter": half fixed, half random,
/// so a fleet of boxes does not retry in step.
pub fn backoff_delay(b: &Backoff, n: u32) -> Duration {
    let exp = b
        .multiplier
        .powi(n.saturating_sub(1).min(64) as i32)
        .min(1e9);
    let base = b.initial.as_secs_f64() * exp;
    let capped = base.min(b.max.as_secs_f64());
    let mut r = [0u8; 4];
    let unit = if getrandom::fill(&mut r).is_ok() {
        u32::from_le_bytes(r) as f64 / u32::MAX as f64
    } else {
        0.5
    };
    // The config bounds retry_max to a day; try_from also refuses NaN and infinity.
    Duration::try_from_secs_f64(capped / 2.0 + capped / 2.0 * unit).unwrap_or(b.max)
}

/// Waits `d`; true when shutdown came first.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        };
        for n in 1..40 {
            let d = backoff_delay(&b, n);
            let full = (0.1 * 2f64.powi(n as i32 - 1)).min(2.0);
            assert!(d.as_secs_f64() >= full / 2.0 - 1e-9, "{n}: {d:?}");
            assert!(d.as_secs_f64() <= full + 1e-9, "{n}: {d:?}");
        }
    }

    #[test]
    fn answers_are_classified() {
        let ack = |code: &str, ctrl: &str| {
            format!("MSH|^~\\&|UP|H|GW|C|20250101||ACK^A01|9|P|2.5\rMSA|{code}|{ctrl}\r")
                .into_bytes()
        };
        assert!(classify(&ack("AA", "C1"), "C1").is_ok());
        assert!(classify(&ack("CA", "C1"), "C1").is_ok());
        match classify(&ack("AA", "MRN4711"), "C1") {
            Err(Failure::Attempt { reason, .. }) => {
                assert!(
                    reason.contains("7 characters") && reason.contains("\"C1\""),
                    "{reason}"
                );
                assert!(
                    !reason.contains("MRN4711"),
                    "the destination's MSA-2 in {reason}"
                );
            }
            _ => panic!("a wrong MSA-2 must be a failed attempt"),
        }
        assert!(matches!(
            classify(&ack("AE", "C1"), "C1"),
            Err(Failure::Attempt {
                ack: Some(AckCode::AE),
                ..
            })
        ));
        assert!(matches!(
            classify(&ack("AR", "C1"), "C1"),
            Err(Failure::Rejected { .. })
        ));
        assert!(matches!(
            classify(b"garbage", "C1"),
            Err(Failure::Attempt { .. })
        ));
        assert!(classify(&[0x06], "C1").is_ok());
    }

    #[tokio::test]
    async fn a_connection_closed_without_an_answer_is_dropped_not_a_wrong_answer() {
        use tokio::io::AsyncReadExt;
        let settings = crate::config::Settings::from_toml(
            "[engine]\nenvironment = \"development\"\n[keys]\nprovider = \"development\"\n\
             [[destination]]\nname = \"d\"\nkind = \"mllp\"\naddress = \"127.0.0.1:1\"\n\
             danger_plaintext = true\n",
            std::path::Path::new("/etc/hl7edge/hl7edge.toml"),
        )
        .unwrap();
        let dest = &settings.destinations[0];
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let mut conn: Conn = MllpClient::with_limit(Box::new(ours), MAX_ACK);
        // The peer reads the message and closes without answering.
        let peer = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = theirs.read(&mut buf).await;
        });
        let r = exchange(
            &mut conn,
            b"MSH|^~\\&|A|B|C|D|1||ADT^A01|C1|P|2.5\r",
            "C1",
            dest,
        )
        .await;
        peer.await.unwrap();
        assert!(matches!(r, Err(Failure::Dropped(_))));
    }
}
