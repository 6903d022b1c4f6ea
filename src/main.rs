//! `hl7edge`: argument parsing -> logging -> settings -> run. Exit 64 on a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hl7edge::config::{Settings, DEFAULT_PATH};

/// Exit code for a bad configuration (EX_CONFIG is 78, but 64 is what operators script for).
const EXIT_CONFIG: u8 = 64;
/// Exit code when start-up fails for any other reason (keys, store, bind).
const EXIT_START: u8 = 70;

#[derive(Parser)]
#[command(name = "hl7edge", version, about = "Hardened HL7 v2 edge gateway")]
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

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("hl7edge: cannot start the runtime: {e}");
            ExitCode::from(EXIT_START)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hl7edge::harden_process();
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
            hl7edge::telemetry::init(false, "info");
            runtime()?
                .block_on(hl7edge::engine::run(settings))
                .map_err(|e| {
                    tracing::error!(error = %e, "Start-up failed.");
                    eprintln!("hl7edge: {e}");
                    ExitCode::from(EXIT_START)
                })
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
            runtime()?.block_on(hl7edge::bench::run(args)).map_err(|e| {
                eprintln!("hl7edge bench: {e:#}");
                ExitCode::from(EXIT_START)
            })
        }
        Command::Store {
            command: StoreCommand::Compact { config },
        } => {
            let settings = load(&config)?;
            let store = open_store(&settings)?;
            let (before, after) = store.compact().map_err(|e| {
                eprintln!("hl7edge: {e}");
                ExitCode::from(EXIT_START)
            })?;
            println!(
                "{}: {before} bytes before, {after} bytes after compaction",
                settings.store.path.display()
            );
            Ok(())
        }
        Command::Queue {
            config,
            json,
            command,
        } => queue(&config, json, command),
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
        Some(a) => a,
        None => {
            // The engine is stopped: the same operations on the store itself.
            let store = open_store(&settings)?;
            let dests: Vec<String> = settings
                .destinations
                .iter()
                .map(|d| d.name.clone())
                .collect();
            match req {
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
            }
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
    }
    Ok(())
}
