//! The operator's view and actions: `hl7edge queue status|dead|replay|discard`.
//!
//! While the engine runs, the CLI talks to it over a Unix socket (mode 0600, and the peer's uid
//! must be the engine's or root): one JSON request line, one JSON answer line. When the engine is
//! stopped, the CLI opens the store itself and runs the same operations. Answers carry metadata
//! only (ids, types, control IDs, codes, reasons), never message content.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::forward::{DestStatus, SharedStatus};
use crate::store::{
    now_ms, Affected, ControlOp, DeadView, Live, QueueFigures, Selector, StoreHandle, StoreReader,
};

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Dead {
        destination: Option<String>,
    },
    Replay(Selector),
    Discard(Selector),
    /// Audit records after `after`, at most `limit` (raw stored values, base64).
    AuditPage {
        after: u64,
        limit: usize,
    },
    /// Checkpoints from seq `from`, at most `limit`.
    AuditCheckpoints {
        from: u64,
        limit: usize,
    },
    /// Records an event of a command run beside the engine (`keys`, `audit export`, ...).
    AuditRecord(Box<crate::audit::Event>),
    /// Reads the TLS files again (`hl7edge tls reload`); answered once done.
    TlsReload,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "lowercase")]
pub enum Answer {
    Status(StatusReport),
    Dead {
        letters: Vec<DeadView>,
    },
    Done {
        affected: Affected,
    },
    /// `(seq, base64 of the stored value)`.
    AuditRows {
        rows: Vec<(u64, String)>,
    },
    Recorded,
    Reloaded(crate::reload::Reloaded),
    Error {
        message: String,
    },
}

/// Per-destination figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationReport {
    pub name: String,
    #[serde(flatten)]
    pub queue: QueueFigures,
    /// Seconds the oldest queued entry has waited.
    pub oldest_age_s: Option<f64>,
    /// Since the engine started; absent when it is stopped.
    pub live: Option<DestStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub engine_running: bool,
    pub stored_bytes: u64,
    pub quota_bytes: u64,
    pub destinations: Vec<DestinationReport>,
}

/// Builds the status report from the store (and the forwarders' live figures when running).
pub fn status_report(
    reader: &StoreReader,
    dests: &[String],
    live: Option<(&[SharedStatus], &Live)>,
    quota: u64,
) -> Result<StatusReport, String> {
    let figures = reader.figures(dests).map_err(|e| e.to_string())?;
    let now = now_ms();
    let stored_bytes = match live {
        Some((_, l)) => l.live_bytes.load(Ordering::Acquire),
        None => reader.live_bytes().map_err(|e| e.to_string())?,
    };
    let destinations = dests
        .iter()
        .zip(figures)
        .enumerate()
        .map(|(i, (name, queue))| DestinationReport {
            name: name.clone(),
            oldest_age_s: queue
                .oldest_queued_ms
                .map(|t| now.saturating_sub(t) as f64 / 1000.0),
            live: live.and_then(|(s, _)| {
                s.get(i)
                    .map(|st| st.lock().unwrap_or_else(|p| p.into_inner()).clone())
            }),
            queue,
        })
        .collect();
    Ok(StatusReport {
        engine_running: live.is_some(),
        stored_bytes,
        quota_bytes: quota,
        destinations,
    })
}

/// What the control socket serves from.
#[derive(Clone)]
pub struct Context {
    pub handle: StoreHandle,
    pub reader: StoreReader,
    pub dests: Vec<String>,
    pub statuses: Vec<SharedStatus>,
    pub live: Arc<Live>,
    pub quota: u64,
    pub audit: crate::store::AuditSink,
    /// Alerts fired per rule since start.
    pub alerts_fired: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    /// The engine's TLS reload (audited as `tls.reloaded`/`tls.reload_failed` with the
    /// socket peer as actor).
    pub tls_reload: Arc<crate::reload::TlsReload>,
}

/// The audit event of an operator request (`None` for the audit trail's own reads, which
/// the command audits itself once, as an export or a verification).
fn admin_event(req: &Request, uid: Option<u32>) -> Option<crate::audit::Event> {
    let what = match req {
        Request::Status => "admin.queue_status",
        Request::Dead { .. } => "admin.queue_dead",
        Request::Replay(_) => "admin.queue_replay",
        Request::Discard(_) => "admin.queue_discard",
        _ => return None,
    };
    let mut e = crate::audit::Event::new(what)
        .actor(actor_of(uid))
        .with("via", "control socket");
    if let Request::Replay(sel) | Request::Discard(sel) = req {
        e = e
            .with("destination", sel.destination.as_deref().unwrap_or("*"))
            .with(
                "message",
                sel.message_id.map_or("*".to_string(), |m| m.to_string()),
            );
    }
    Some(e)
}

/// The audit actor of a socket peer.
fn actor_of(uid: Option<u32>) -> String {
    uid.map_or("uid:?".to_string(), |u| format!("uid:{u}"))
}

/// Encodes raw rows for the socket.
pub fn encode_rows(rows: Vec<(u64, Vec<u8>)>) -> Vec<(u64, String)> {
    use base64::Engine as _;
    rows.into_iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect()
}

impl Context {
    /// Answers a request from local user `uid`, auditing operator actions.
    async fn answer_audited(&self, req: Request, uid: Option<u32>) -> Answer {
        // A command's own record: only operator (`admin.*`) events, and the actor is who is
        // on the socket, whatever the request says.
        let req = match req {
            Request::AuditRecord(e) if !e.event.starts_with("admin.") => {
                return Answer::Error {
                    message: format!("only admin.* events may be recorded, not {}", e.event),
                }
            }
            Request::AuditRecord(mut e) => {
                e.actor = Some(actor_of(uid));
                e.severity = crate::audit::Severity::Info;
                Request::AuditRecord(e)
            }
            Request::TlsReload => return self.tls_reload(actor_of(uid)).await,
            other => other,
        };
        let event = admin_event(&req, uid);
        let answer = self.answer(req).await;
        if let Some(mut e) = event {
            e.outcome = Some(match &answer {
                Answer::Error { .. } => "failed".into(),
                _ => "done".into(),
            });
            if let Answer::Done { affected } = &answer {
                e = e.with("count", affected.len());
            }
            self.audit.record(e);
        }
        answer
    }

    async fn tls_reload(&self, actor: String) -> Answer {
        match Arc::clone(&self.tls_reload).run_blocking(actor).await {
            Ok(done) => Answer::Reloaded(done),
            Err(e) => Answer::Error {
                message: format!("{e}; nothing changed"),
            },
        }
    }

    /// An audit read off the runtime's threads.
    async fn rows(
        &self,
        read: impl FnOnce(&StoreReader) -> Result<Vec<(u64, Vec<u8>)>, crate::store::StoreError>
            + Send
            + 'static,
    ) -> Answer {
        let reader = self.reader.clone();
        match tokio::task::spawn_blocking(move || read(&reader)).await {
            Ok(Ok(rows)) => Answer::AuditRows {
                rows: encode_rows(rows),
            },
            Ok(Err(e)) => Answer::Error {
                message: e.to_string(),
            },
            Err(e) => Answer::Error {
                message: e.to_string(),
            },
        }
    }

    async fn answer(&self, req: Request) -> Answer {
        match req {
            Request::AuditPage { after, limit } => {
                self.rows(move |r| r.audit_page(after, limit.min(10_000)))
                    .await
            }
            Request::AuditCheckpoints { from, limit } => {
                self.rows(move |r| r.audit_checkpoints(from, limit.min(10_000)))
                    .await
            }
            Request::AuditRecord(e) => {
                self.audit.record(*e);
                Answer::Recorded
            }
            Request::Status => {
                let this = self.clone();
                let r = tokio::task::spawn_blocking(move || {
                    status_report(
                        &this.reader,
                        &this.dests,
                        Some((&this.statuses, &this.live)),
                        this.quota,
                    )
                })
                .await;
                match r {
                    Ok(Ok(rep)) => Answer::Status(rep),
                    Ok(Err(message)) => Answer::Error { message },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Dead { destination } => {
                let reader = self.reader.clone();
                let r = tokio::task::spawn_blocking(move || {
                    reader.dead_letters(destination.as_deref())
                })
                .await;
                match r {
                    Ok(Ok(letters)) => Answer::Dead { letters },
                    Ok(Err(e)) => Answer::Error {
                        message: e.to_string(),
                    },
                    Err(e) => Answer::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Replay(sel) => self.act(ControlOp::Replay(sel)).await,
            Request::Discard(sel) => self.act(ControlOp::Discard(sel)).await,
            // Answered by `answer_audited`, which knows the peer.
            Request::TlsReload => Answer::Error {
                message: "a TLS reload needs the socket peer".into(),
            },
        }
    }

    async fn act(&self, op: ControlOp) -> Answer {
        let what = match &op {
            ControlOp::Replay(_) => "replay",
            ControlOp::Discard(_) => "discard",
        };
        match self.handle.control(op).await {
            Ok(affected) => {
                // The applier audits each message; the operator's request is audited by
                // `answer_audited`.
                for (dest, id) in &affected {
                    tracing::info!(action = what, destination = %dest, message_id = id, "Dead letter {what} by operator.");
                }
                Answer::Done { affected }
            }
            Err(e) => Answer::Error {
                message: e.to_string(),
            },
        }
    }
}

/// Binds the control socket (owner-only).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a previous run (the store lock proves no engine holds it now).
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the control socket until shutdown.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Control socket accept failed.");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|u| u == me || u == 0) {
            tracing::warn!(uid = ?uid, "Control socket connection from another user refused.");
            ctx.audit.record(
                crate::audit::Event::new("auth.failed")
                    .severity(crate::audit::Severity::Warning)
                    .actor(actor_of(uid))
                    .outcome("refused")
                    .with(
                        "reason",
                        "control socket user is neither root nor the engine's",
                    ),
            );
            continue;
        }
        let ctx = ctx.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            loop {
                let line = tokio::select! {
                    l = lines.next_line() => match l {
                        Ok(Some(line)) => line,
                        _ => break,
                    },
                    _ = stop.changed() => break,
                };
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => ctx.answer_audited(req, uid).await,
                    Err(e) => Answer::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Sends one request to a running engine. `Ok(None)`: no engine listens on `path`.
pub fn request(path: &Path, req: &Request) -> Result<Option<Answer>, String> {
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| format!("unreadable answer from the engine: {e}"))
}

/// Human table of a status report.
pub fn render_status(r: &StatusReport) -> String {
    let mut out = format!(
        "engine: {}   stored: {} of quota {} bytes ({:.1} %)\n",
        if r.engine_running {
            "running"
        } else {
            "stopped (figures from the store)"
        },
        r.stored_bytes,
        r.quota_bytes,
        r.stored_bytes as f64 * 100.0 / r.quota_bytes.max(1) as f64
    );
    out.push_str(&format!(
        "{:<20} {:>8} {:>10} {:>6} {:>10} {:>8} {:>8} {:<11} last error\n",
        "destination", "depth", "oldest", "dead", "delivered", "retried", "dead-lt", "state"
    ));
    for d in &r.destinations {
        let age = d
            .oldest_age_s
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        let (delivered, retried, dl, state, err) = match &d.live {
            Some(l) => (
                l.delivered.to_string(),
                l.retried.to_string(),
                l.dead_lettered.to_string(),
                l.state.clone(),
                l.last_error.clone().unwrap_or_else(|| "-".into()),
            ),
            None => (
                "-".into(),
                "-".into(),
                "-".into(),
                "stopped".into(),
                "-".into(),
            ),
        };
        out.push_str(&format!(
            "{:<20} {:>8} {:>10} {:>6} {:>10} {:>8} {:>8} {:<11} {}\n",
            d.name, d.queue.depth, age, d.queue.dead_letters, delivered, retried, dl, state, err
        ));
    }
    out
}

/// Human table of dead letters.
pub fn render_dead(letters: &[DeadView]) -> String {
    let mut out = format!(
        "{:<10} {:<16} {:<16} {:<20} {:>8} {:<4} reason\n",
        "id", "destination", "type", "control id", "attempts", "ack"
    );
    for l in letters {
        let (ty, ctrl) = l
            .meta
            .as_ref()
            .map(|m| (m.message_type.as_str(), m.control_id.as_str()))
            .unwrap_or(("?", "?"));
        out.push_str(&format!(
            "{:<10} {:<16} {:<16} {:<20} {:>8} {:<4} {}\n",
            l.letter.message_id,
            l.destination,
            ty,
            ctrl,
            l.letter.attempts,
            l.letter.last_ack.as_deref().unwrap_or("-"),
            l.letter.reason
        ));
    }
    out
}
