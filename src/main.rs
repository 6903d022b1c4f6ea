//! `hl7edge`: argument parsing -> logging -> settings -> run. Exit 64 on a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hl7edge::config::{Settings, DEFAULT_PATH};

/// Exit code for a bad configuration (EX_CONFIG is 78, but 64 is what operators script for).
const EXIT_CONFIG: u8 = 64;
/// Exit code when start-up fails for any other reason (store, bind, ...).
const EXIT_START: u8 = 70;
/// Exit code of `audit verify` when the chain is broken (EX_DATAERR).
const EXIT_TAMPERED: u8 = 65;
/// Exit code when keys exist but cannot be unsealed: TPM absent, PCR mismatch, corrupt or
/// foreign blob, wrong development key file (promise 7: the engine does not start).
const EXIT_KEYS: u8 = 71;

/// `hl7edge --version`: also which key sealers this build has (the TPM one is a cargo feature).
#[cfg(feature = "tpm")]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (key sealers: tpm, development)"
);
#[cfg(not(feature = "tpm"))]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (key sealers: development only; built without the `tpm` feature)"
);

#[derive(Parser)]
#[command(
    name = "hl7edge",
    version,
    long_version = LONG_VERSION,
    about = "Hardened HL7 v2 edge gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine.
    Run {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file: exit 0 when valid, 64 naming file and key otherwise.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Start a complete local instance with generated certificates and send sample messages.
    Demo {
        /// State folder (default: a new temporary folder, printed).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Keep running after the samples, so you can send your own.
        #[arg(long)]
        serve: bool,
    },
    /// Measure durable intake throughput and ACK latency against a local engine.
    Bench(hl7edge::bench::BenchArgs),
    /// Inspect the store (engine stopped).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The key hierarchy: generate, seal, inspect, rotate (never prints key bytes, except
    /// `unseal-disk` to a pipe).
    Keys {
        #[arg(long, short, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The tamper-evident audit trail: verify, export for a SIEM, search for incident
    /// response. From the running engine over its control socket, or from the store.
    Audit {
        #[arg(long, short, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// TLS certificates, keys and CAs of the running engine.
    Tls {
        #[arg(long, short, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Destination queues and dead letters: from the running engine over its control socket,
    /// or from the store when the engine is stopped.
    Queue {
        #[arg(long, short, default_value = DEFAULT_PATH, global = true)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Read again the TLS files the configuration names (listeners' cert, key and client CA;
    /// destinations' CA and client certificate) and use them for new connections; all or
    /// nothing. Answers once done: exit 0, or 70 naming the listener or destination and file.
    Reload,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// List stored messages: id, time, listener, type, control ID (no content).
    List {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Rewrite the store without its free space, returning it to the filesystem (engine stopped).
    Compact {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate and seal every key that is missing (message, audit, disk, tunnel); idempotent.
    Init,
    /// Which keys exist, the sealer and PCR set, whether each unseals now, and the stored
    /// records per message key id (engine stopped). Exit 71 when a key does not unseal.
    Status,
    /// Add a new key id; new records use it, old records stay readable. Restart the engine.
    Rotate {
        #[arg(value_enum)]
        key: RotateKey,
    },
    /// Re-encrypt every stored record under the newest message key (engine stopped).
    Rewrap,
    /// Seal every key again under the configured PCR set and the current PCR values (after
    /// changing `pcrs`, in the expected boot state). Every key must unseal first.
    Reseal,
    /// Generate and seal the LUKS2 data partition's key when missing; idempotent.
    SealDisk,
    /// Write the disk key to stdout for `cryptsetup open --key-file=-`; refused on a terminal.
    UnsealDisk,
    /// Print the WireGuard public key (base64) of the tunnel key.
    TunnelPubkey,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RotateKey {
    Message,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain and its signed checkpoints; report the first bad sequence number.
    /// Exit 0 when intact, 65 when not.
    Verify {
        /// Checkpoint public key (base64, as `audit public-key` prints it); default: derived
        /// from the sealed audit key.
        #[arg(long)]
        public_key: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write records as JSON lines (MRN as its token) for a SIEM.
    Export(AuditQuery),
    /// A table of records for incident response: which messages of a patient went where.
    Search(AuditQuery),
    /// Print the checkpoint public key (base64) for auditors who verify without the TPM.
    PublicKey,
}

#[derive(clap::Args)]
struct AuditQuery {
    /// From this time (RFC 3339, UTC) or this long ago (`24h`).
    #[arg(long)]
    since: Option<String>,
    /// Until this time, or this long ago.
    #[arg(long)]
    until: Option<String>,
    /// Records of this patient's messages (the MRN is turned into its token; never stored).
    /// `-` reads it from stdin, keeping it out of the process list and shell history.
    #[arg(long)]
    mrn: Option<String>,
    /// Records of the message with this MSH-10.
    #[arg(long)]
    control_id: Option<String>,
    /// Only event types starting with this (`message.`, `auth.failed`, `alert.`).
    #[arg(long)]
    event: Option<String>,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Per destination: depth, oldest age, dead letters, delivered, retried, state, last error.
    Status,
    /// List dead letters (metadata only).
    Dead {
        #[arg(long)]
        destination: Option<String>,
    },
    /// Put dead letters back at the end of their queues.
    Replay {
        /// Message id (as `queue dead` lists it).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every dead letter (of `--destination`, if given).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        destination: Option<String>,
    },
    /// Remove a dead letter; its message is then deleted after `retention`.
    Discard {
        id: u64,
        #[arg(long)]
        destination: Option<String>,
    },
}

fn load(config: &std::path::Path) -> Result<Settings, ExitCode> {
    Settings::load(config).map_err(|e| {
        eprintln!("hl7edge: configuration error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The engine's runtime: a worker per core.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    build_runtime(
        tokio::runtime::Builder::new_multi_thread().thread_stack_size(hl7edge::THREAD_STACK),
    )
}

fn build_runtime(
    builder: &mut tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("hl7edge: cannot start the runtime: {e}");
        ExitCode::from(EXIT_START)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hl7edge::harden_process();
    // libtss2 logs to stderr by default; our errors say what failed. Set while single-threaded.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn run(cli: Cli) -> Result<(), ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => {
            let s = load(&config)?;
            println!(
                "{}: valid ({} listener(s), state in {})",
                config.display(),
                s.listeners.len(),
                s.state_dir.display()
            );
            Ok(())
        }
        Command::Run { config } => {
            let settings = load(&config)?;
            // tss-esapi logs every failed TPM command at ERROR through `log`; our own error
            // names the key and the cause, so its lines are noise.
            hl7edge::telemetry::init(false, "info,tss_esapi=off");
            lock_memory();
            runtime()?
                .block_on(hl7edge::engine::run(settings))
                .map_err(|e| {
                    tracing::error!(error = %e, "Start-up failed.");
                    eprintln!("hl7edge: {e}");
                    match e {
                        hl7edge::engine::EngineError::Keys(k) if k.is_unseal_failure() => {
                            ExitCode::from(EXIT_KEYS)
                        }
                        _ => ExitCode::from(EXIT_START),
                    }
                })
        }
        Command::Keys { config, command } => {
            let settings = load(&config)?;
            init_cli_logging();
            lock_memory();
            let op = keys_op_name(&command);
            let result = keys(&settings, command);
            // Key operations are audited, whether they worked or not.
            let event = hl7edge::audit::Event::new(&format!("admin.keys_{op}"))
                .actor(hl7edge::audit::cli::local_actor())
                .outcome(if result.is_ok() { "done" } else { "failed" });
            if let Err(e) = hl7edge::audit::cli::record(&settings, event) {
                eprintln!("hl7edge: the key operation could not be audited: {e}");
            }
            result
        }
        Command::Demo { state_dir, serve } => {
            hl7edge::telemetry::init(true, "warn");
            runtime()?
                .block_on(hl7edge::demo::run(state_dir, serve))
                .map_err(|e| {
                    eprintln!("hl7edge demo: {e:#}");
                    ExitCode::from(EXIT_START)
                })
        }
        Command::Bench(args) => {
            hl7edge::telemetry::init(true, "warn");
            // The load generator and the upstream receiver share one thread, leaving the
            // cores to the engine process it measures.
            build_runtime(&mut tokio::runtime::Builder::new_current_thread())?
                .block_on(hl7edge::bench::run(args))
                .map_err(|e| {
                    eprintln!("hl7edge bench: {e:#}");
                    ExitCode::from(EXIT_START)
                })
        }
        Command::Store {
            command: StoreCommand::Compact { config },
        } => {
            let settings = load(&config)?;
            init_cli_logging();
            let store = open_store(&settings)?;
            let (before, after) = store.compact().map_err(|e| {
                eprintln!("hl7edge: {e}");
                ExitCode::from(EXIT_START)
            })?;
            println!(
                "{}: {before} bytes before, {after} bytes after compaction",
                settings.store.path.display()
            );
            let event = hl7edge::audit::Event::new("admin.store_compact")
                .actor(hl7edge::audit::cli::local_actor())
                .outcome("done")
                .with("bytes_before", before)
                .with("bytes_after", after);
            if let Err(e) = hl7edge::audit::cli::record(&settings, event) {
                eprintln!("hl7edge: the compaction could not be audited: {e}");
            }
            Ok(())
        }
        Command::Queue {
            config,
            json,
            command,
        } => queue(&config, json, command),
        Command::Tls { config, command } => tls(&config, command),
        Command::Audit { config, command } => {
            let settings = load(&config)?;
            init_cli_logging();
            audit(&settings, command)
        }
        Command::Store {
            command: StoreCommand::List { config },
        } => {
            let settings = load(&config)?;
            let store = open_store(&settings)?;
            let list = store.reader().list().map_err(|e| {
                eprintln!("hl7edge: {e}");
                ExitCode::from(EXIT_START)
            })?;
            for (id, m) in list {
                println!(
                    "{id}\t{}\t{}\t{}\t{}\t{}",
                    m.received_ms, m.listener, m.message_type, m.sending_application, m.control_id
                );
            }
            Ok(())
        }
    }
}

/// Logging of the operator commands (`keys`, `audit`, `queue`, `store`): warnings to stderr,
/// or to journald when it runs, with the audit records these commands append.
fn init_cli_logging() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        hl7edge::telemetry::init(
            false,
            "warn,hl7edge::audit=info,hl7edge::alert=info,tss_esapi=off",
        );
    } else {
        hl7edge::telemetry::init(true, "warn,tss_esapi=off");
    }
}

/// Keeps key pages out of swap: mlockall(MCL_CURRENT | MCL_FUTURE) when permitted.
fn lock_memory() {
    if let Err(e) = hl7edge::lock_memory() {
        tracing::warn!(reason = %e, "Memory not locked (mlockall): key pages could be swapped out where swap exists. Grant CAP_IPC_LOCK or LimitMEMLOCK=infinity.");
    }
}

fn keys_op_name(c: &KeysCommand) -> &'static str {
    match c {
        KeysCommand::Init => "init",
        KeysCommand::Status => "status",
        KeysCommand::Rotate { .. } => "rotate_message",
        KeysCommand::Rewrap => "rewrap",
        KeysCommand::Reseal => "reseal",
        KeysCommand::SealDisk => "seal_disk",
        KeysCommand::UnsealDisk => "unseal_disk",
        KeysCommand::TunnelPubkey => "tunnel_pubkey",
    }
}

fn key_fail(e: hl7edge::keys::KeyError) -> ExitCode {
    eprintln!("hl7edge: {e}");
    ExitCode::from(if e.is_unseal_failure() {
        EXIT_KEYS
    } else {
        EXIT_START
    })
}

fn keys(settings: &Settings, command: KeysCommand) -> Result<(), ExitCode> {
    use hl7edge::keys::{self, Envelope, KeyKind};
    use std::io::{IsTerminal, Write};
    use std::os::fd::AsFd;
    let state = &settings.state_dir;
    // One owner of the sealer (and of the TPM connection) for the whole command.
    let mut sealer = keys::open_sealer(&settings.keys).map_err(key_fail)?;
    let sealer = sealer.as_mut();
    match command {
        KeysCommand::Init => {
            for kind in KeyKind::ALL {
                let (id, created) = keys::ensure(sealer, state, kind).map_err(key_fail)?;
                let what = if created {
                    "generated and sealed"
                } else {
                    "exists"
                };
                println!("{}-{id}\t{what}", kind.name());
            }
        }
        KeysCommand::SealDisk => {
            let (id, created) = keys::ensure(sealer, state, KeyKind::Disk).map_err(key_fail)?;
            let what = if created {
                "generated and sealed"
            } else {
                "exists"
            };
            println!("disk-{id}\t{what}");
        }
        KeysCommand::UnsealDisk => {
            let mut out = std::io::stdout().lock();
            if out.is_terminal() {
                eprintln!("hl7edge: refusing to write the disk key to a terminal; pipe it: hl7edge keys unseal-disk | cryptsetup open --key-file=- DEVICE NAME");
                return Err(ExitCode::from(EXIT_START));
            }
            // Nor into a file, where it would sit in plaintext (promise 3): a pipe or a socket.
            let to_file = nix::sys::stat::fstat(std::io::stdout().as_fd()).is_ok_and(|st| {
                let kind = st.st_mode & nix::libc::S_IFMT;
                kind != nix::libc::S_IFIFO && kind != nix::libc::S_IFSOCK
            });
            if to_file {
                eprintln!("hl7edge: refusing to write the disk key anywhere but a pipe; pipe it: hl7edge keys unseal-disk | cryptsetup open --key-file=- DEVICE NAME");
                return Err(ExitCode::from(EXIT_START));
            }
            let (_, key) = keys::load_current(sealer, state, KeyKind::Disk).map_err(key_fail)?;
            out.write_all(keys::disk_key_bytes(&key))
                .and_then(|()| out.flush())
                .map_err(fail)?;
        }
        KeysCommand::TunnelPubkey => {
            let (_, key) = keys::load_current(sealer, state, KeyKind::Tunnel).map_err(key_fail)?;
            println!("{}", keys::tunnel_public_key(&key));
        }
        KeysCommand::Rotate {
            key: RotateKey::Message,
        } => {
            // The current keys must unseal first: never rotate away from keys we cannot read.
            keys::load_message_keys(sealer, state).map_err(key_fail)?;
            let id = keys::rotate(sealer, state, KeyKind::Message).map_err(key_fail)?;
            println!("message-{id}\tgenerated and sealed; new records use it after the engine restarts; old records stay readable (`hl7edge keys rewrap` re-encrypts them)");
        }
        KeysCommand::Reseal => {
            for name in keys::reseal(sealer, state).map_err(key_fail)? {
                println!("{name}\tre-sealed");
            }
        }
        KeysCommand::Rewrap => {
            let envelope = keys::load_message_keys(sealer, state).map_err(key_fail)?;
            let current = envelope.current_key_id();
            let store = open_store(settings)?;
            let replaced = store
                .rewrite_bodies(|id, body| {
                    if Envelope::key_id_of(body) == Some(current) {
                        return Ok(None);
                    }
                    let plain = envelope.open(id, body)?;
                    envelope.seal(id, &plain).map(Some)
                })
                .map_err(fail)?
                .map_err(fail)?;
            println!("{replaced} record(s) re-encrypted under message key {current}");
        }
        KeysCommand::Status => {
            println!("sealer\t{}", sealer.describe());
            let list = keys::status(sealer, state).map_err(key_fail)?;
            // Records per message key id, when the store exists and the engine is stopped.
            let mut per_key: std::collections::BTreeMap<Option<u32>, u64> = Default::default();
            let records = if !settings.store.path.exists() {
                Some(per_key.clone())
            } else {
                match hl7edge::store::Store::open(&settings.store) {
                    Ok(store) => {
                        store
                            .visit_bodies(|_, body| {
                                *per_key.entry(Envelope::key_id_of(body)).or_default() += 1;
                            })
                            .map_err(fail)?;
                        Some(per_key)
                    }
                    Err(e) => {
                        eprintln!("hl7edge: records per key unknown: {e}");
                        None
                    }
                }
            };
            let mut failed = false;
            for kind in KeyKind::ALL {
                let of_kind: Vec<_> = list.iter().filter(|k| k.kind == kind).collect();
                if of_kind.is_empty() {
                    let hint = if kind == KeyKind::Disk {
                        "seal-disk"
                    } else {
                        "init"
                    };
                    println!("{}\tmissing\t(hl7edge keys {hint})", kind.name());
                }
                let newest = of_kind.last().map(|k| k.id);
                for k in of_kind {
                    let mut line = format!("{}-{}", kind.name(), k.id);
                    match &k.unseal {
                        Ok(()) => line.push_str("\tunseals"),
                        Err(e) => {
                            failed = true;
                            line.push_str(&format!("\tFAILED: {e}"));
                        }
                    }
                    if let Some(p) = &k.policy {
                        line.push_str(&format!("\tpcrs={p}"));
                    }
                    if kind == KeyKind::Message {
                        if Some(k.id) == newest {
                            line.push_str("\tcurrent");
                        }
                        if let Some(r) = &records {
                            let n = r.get(&Some(k.id)).copied().unwrap_or(0);
                            line.push_str(&format!("\trecords={n}"));
                        }
                    }
                    println!("{line}");
                }
            }
            match &records {
                None => println!(
                    "records\tunknown: the store cannot be opened (in use by the running engine?)"
                ),
                Some(r) => {
                    let known: std::collections::BTreeSet<u32> = list
                        .iter()
                        .filter(|k| k.kind == KeyKind::Message)
                        .map(|k| k.id)
                        .collect();
                    for (id, n) in r {
                        match id {
                            Some(id) if known.contains(id) => {}
                            Some(id) => {
                                failed = true;
                                println!("message-{id}\tMISSING: {n} record(s) are sealed under it and no blob exists");
                            }
                            None => println!("records\t{n} unreadable record(s)"),
                        }
                    }
                }
            }
            if failed {
                return Err(ExitCode::from(EXIT_KEYS));
            }
        }
    }
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("hl7edge: {e}");
    ExitCode::from(EXIT_START)
}

/// Opens the store of a stopped engine; says so when the engine holds it.
fn open_store(settings: &Settings) -> Result<hl7edge::store::Store, ExitCode> {
    hl7edge::store::Store::open(&settings.store).map_err(|e| {
        let held = matches!(&e, hl7edge::store::StoreError::Open { source, .. }
            if matches!(**source, redb::Error::DatabaseAlreadyOpen));
        if held {
            fail(format!(
                "{} is in use by a running engine (and its control socket {} does not answer)",
                settings.store.path.display(),
                settings.control_socket.display()
            ))
        } else {
            fail(e)
        }
    })
}

fn queue(config: &std::path::Path, json: bool, command: QueueCommand) -> Result<(), ExitCode> {
    use hl7edge::control::{self, Answer, Request};
    use hl7edge::store::{ControlOp, Selector};
    let settings = load(config)?;
    init_cli_logging();
    let req = match command {
        QueueCommand::Status => Request::Status,
        QueueCommand::Dead { destination } => Request::Dead { destination },
        QueueCommand::Replay {
            id,
            all: _,
            destination,
        } => Request::Replay(Selector {
            destination,
            message_id: id,
        }),
        QueueCommand::Discard { id, destination } => Request::Discard(Selector {
            destination,
            message_id: Some(id),
        }),
    };
    let answer = match control::request(&settings.control_socket, &req).map_err(fail)? {
        // The engine audits requests on its socket.
        Some(a) => a,
        None => {
            // The engine is stopped: the same operations on the store itself.
            let dests: Vec<String> = settings
                .destinations
                .iter()
                .map(|d| d.name.clone())
                .collect();
            let req_kind = match &req {
                Request::Status => QueueKind::Status,
                Request::Dead { .. } => QueueKind::Dead,
                Request::Replay(_) => QueueKind::Replay,
                _ => QueueKind::Discard,
            };
            let run = |store: hl7edge::store::Store| -> Result<Answer, ExitCode> {
                Ok(match req {
                    Request::Status => {
                        let reader = store.reader();
                        control::status_report(&reader, &dests, None, settings.store.quota)
                            .map(Answer::Status)
                            .map_err(fail)?
                    }
                    Request::Dead { destination } => Answer::Dead {
                        letters: store
                            .reader()
                            .dead_letters(destination.as_deref())
                            .map_err(fail)?,
                    },
                    Request::Replay(sel) => Answer::Done {
                        affected: store.control(&ControlOp::Replay(sel)).map_err(fail)?,
                    },
                    Request::Discard(sel) => Answer::Done {
                        affected: store.control(&ControlOp::Discard(sel)).map_err(fail)?,
                    },
                    _ => Answer::Error {
                        message: "not a queue command".into(),
                    },
                })
            };
            // The store is released before the audit reopens it (one handle per file).
            let answer = run(open_store(&settings)?)?;
            // The engine is stopped: the operator's action is audited here.
            let what = match &req_kind {
                QueueKind::Status => "admin.queue_status",
                QueueKind::Dead => "admin.queue_dead",
                QueueKind::Replay => "admin.queue_replay",
                QueueKind::Discard => "admin.queue_discard",
            };
            let mut event = hl7edge::audit::Event::new(what)
                .actor(hl7edge::audit::cli::local_actor())
                .outcome("done")
                .with("via", "store (engine stopped)");
            if let Answer::Done { affected } = &answer {
                event = event.with("count", affected.len());
            }
            if let Err(e) = hl7edge::audit::cli::record(&settings, event) {
                eprintln!("hl7edge: the action could not be audited: {e}");
            }
            answer
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
        return match answer {
            Answer::Error { .. } => Err(ExitCode::from(EXIT_START)),
            _ => Ok(()),
        };
    }
    match answer {
        Answer::Status(r) => print!("{}", control::render_status(&r)),
        Answer::Dead { letters } => print!("{}", control::render_dead(&letters)),
        Answer::Done { affected } => {
            if affected.is_empty() {
                eprintln!("hl7edge: no dead letter matched");
                return Err(ExitCode::from(EXIT_START));
            }
            for (dest, id) in affected {
                println!("{id}\t{dest}");
            }
        }
        Answer::Error { message } => return Err(fail(message)),
        Answer::AuditRows { .. } | Answer::Recorded | Answer::Reloaded(_) => {}
    }
    Ok(())
}

/// `hl7edge tls reload`: the running engine reads its TLS files again; answers once done
/// (systemd's `ExecReload=`), exit 0 or 70 naming what failed.
fn tls(config: &std::path::Path, command: TlsCommand) -> Result<(), ExitCode> {
    use hl7edge::control::{self, Answer, Request};
    let TlsCommand::Reload = command;
    let settings = load(config)?;
    init_cli_logging();
    match control::request(&settings.control_socket, &Request::TlsReload).map_err(fail)? {
        Some(Answer::Reloaded(done)) => {
            let names = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            println!(
                "TLS reloaded: listeners {}; destinations {}",
                names(&done.listeners),
                names(&done.destinations)
            );
            Ok(())
        }
        Some(Answer::Error { message }) => Err(fail(format!("tls reload: {message}"))),
        Some(_) => Err(fail("tls reload: unexpected answer from the engine")),
        None => Err(fail(format!(
            "tls reload: the engine is not running (no control socket at {}); it reads its files when it starts",
            settings.control_socket.display()
        ))),
    }
}

enum QueueKind {
    Status,
    Dead,
    Replay,
    Discard,
}

/// The checkpoint keys, from the sealed audit key.
fn audit_keys(settings: &Settings) -> Result<hl7edge::audit::AuditKeys, ExitCode> {
    use hl7edge::keys::{self, KeyKind};
    let mut sealer = keys::open_sealer(&settings.keys).map_err(key_fail)?;
    let (_, key) = keys::load_current(sealer.as_mut(), &settings.state_dir, KeyKind::Audit)
        .map_err(key_fail)?;
    Ok(hl7edge::audit::AuditKeys::derive(&key))
}

fn audit(settings: &Settings, command: AuditCommand) -> Result<(), ExitCode> {
    use hl7edge::audit::cli::{self, Source};
    use hl7edge::audit::Event;
    let actor = cli::local_actor();
    match command {
        AuditCommand::PublicKey => {
            println!("{}", audit_keys(settings)?.public_key());
            Ok(())
        }
        AuditCommand::Verify { public_key, json } => {
            let key = match public_key {
                Some(text) => hl7edge::audit::parse_public_key(&text).ok_or_else(|| {
                    eprintln!("hl7edge: --public-key: not a base64 Ed25519 public key");
                    ExitCode::from(EXIT_CONFIG)
                })?,
                None => audit_keys(settings)?.verifying_key(),
            };
            let src = Source::open(settings).map_err(fail)?;
            let report = cli::verify(&src, key).map_err(fail)?;
            let outcome = match &report.problem {
                None => "intact".to_string(),
                Some(p) => format!("broken at {}", p.seq),
            };
            let event = Event::new("admin.audit_verify")
                .actor(actor)
                .outcome(outcome)
                .with("records", report.records);
            if let Err(e) = cli::finish_with(settings, src, event) {
                eprintln!("hl7edge: the verification itself could not be audited: {e}");
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{}", cli::render_report(&report));
            }
            match report.problem {
                None => Ok(()),
                Some(_) => Err(ExitCode::from(EXIT_TAMPERED)),
            }
        }
        AuditCommand::Export(q) => audit_query(settings, q, true, actor),
        AuditCommand::Search(q) => audit_query(settings, q, false, actor),
    }
}

fn audit_query(
    settings: &Settings,
    q: AuditQuery,
    export: bool,
    actor: String,
) -> Result<(), ExitCode> {
    use hl7edge::audit::cli::{self, Filter, Source};
    use hl7edge::audit::Event;
    let time = |t: Option<String>, key: &str| -> Result<Option<u64>, ExitCode> {
        t.map(|t| {
            cli::parse_time(&t).map_err(|e| {
                eprintln!("hl7edge: --{key}: {e}");
                ExitCode::from(EXIT_CONFIG)
            })
        })
        .transpose()
    };
    let mrn_token = match q.mrn.as_deref() {
        // `-`: read from stdin, so the MRN is not in the process list or shell history.
        Some("-") => {
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line).map_err(fail)?;
            Some(audit_keys(settings)?.token(line.trim()))
        }
        Some(mrn) => {
            eprintln!("hl7edge: note: an MRN on the command line shows in the process list and stays in shell history; `--mrn -` reads it from stdin");
            Some(audit_keys(settings)?.token(mrn))
        }
        None => None,
    };
    let filter = Filter {
        since_ms: time(q.since, "since")?,
        until_ms: time(q.until, "until")?,
        mrn_token,
        control_id: q.control_id,
        event: q.event,
    };
    let src = Source::open(settings).map_err(fail)?;
    let mut out = std::io::stdout().lock();
    let count = if export {
        cli::export(&src, &filter, &mut out)
    } else {
        cli::search(&src, &filter, &mut out)
    }
    .map_err(fail)?;
    let mut event = Event::new(if export {
        "admin.audit_export"
    } else {
        "admin.audit_search"
    })
    .actor(actor)
    .outcome("done")
    .with("count", count);
    if let Some(t) = &filter.mrn_token {
        event = event.with("mrn_token", t);
    }
    if let Some(c) = &filter.control_id {
        event = event.with("control_id", c);
    }
    cli::finish_with(settings, src, event).map_err(|e| {
        eprintln!("hl7edge: the export could not be audited: {e}");
        ExitCode::from(EXIT_START)
    })
}
