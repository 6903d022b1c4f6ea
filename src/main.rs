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
}

#[derive(Subcommand)]
enum StoreCommand {
    /// List stored messages: id, time, listener, type, control ID (no content).
    List {
        #[arg(long, short, default_value = DEFAULT_PATH)]
        config: PathBuf,
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
            command: StoreCommand::List { config },
        } => {
            let settings = load(&config)?;
            let store = hl7edge::store::Store::open(&settings.store).map_err(|e| {
                eprintln!("hl7edge: {e}");
                ExitCode::from(EXIT_START)
            })?;
            let list = store.list().map_err(|e| {
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
