//! `hl7edge demo`: a complete local instance on loopback with generated certificates, the
//! development key sealer and a state folder it creates; it sends sample messages over MLLPS
//! with a client certificate, prints their ACKs, and tells how to send your own.

pub mod samples;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::client::MllpClient;
use crate::config::Settings;
use crate::devpki;
use crate::engine::Engine;

/// Preferred demo ports; the demo falls back to free ones when these are taken.
const MLLPS_PORT: u16 = 2575;
const MLLP_PORT: u16 = 2576;

fn port_or_free(preferred: u16) -> u16 {
    match std::net::TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => preferred,
        Err(_) => std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0),
    }
}

/// Where the demo (or the benchmark) forwards to.
pub enum Forward {
    /// Intake only: no destination, no route.
    None,
    /// The built-in hospital over MLLPS with mutual TLS (demo CA, client certificate).
    Tls(std::net::SocketAddr),
    /// The built-in hospital over plaintext MLLP on loopback (the benchmark).
    Plain(std::net::SocketAddr),
}

/// Writes the demo configuration into `state_dir` and returns its path.
pub fn write_config(
    state_dir: &std::path::Path,
    pki: &devpki::DevPki,
    mllps_port: u16,
    mllp_port: u16,
    forward: Forward,
) -> anyhow::Result<PathBuf> {
    let destination = match forward {
        Forward::None => String::new(),
        Forward::Tls(addr) => format!(
            r#"
# The built-in "central hospital" receiver, over MLLP with mutual TLS.
[[destination]]
name = "hospital"
kind = "mllps"
address = "{addr}"
server_name = "localhost"
ca = "{ca}"
client_cert = "{cert}"
client_key = "{key}"
retry_initial = "200ms"
retry_max = "5s"
"#,
            ca = pki.ca_cert.display(),
            cert = pki.client_cert.display(),
            key = pki.client_key.display(),
        ),
        Forward::Plain(addr) => format!(
            r#"
[[destination]]
name = "hospital"
kind = "mllp"
address = "{addr}"
danger_plaintext = true          # loopback benchmark only
retry_initial = "50ms"
retry_max = "1s"
"#
        ),
    };
    let route = if destination.is_empty() {
        ""
    } else {
        r#"
[[route]]
name = "everything-to-hospital"
message_types = ["*"]
destinations = ["hospital"]
"#
    };
    let config = format!(
        r#"# hl7edge demo configuration (loopback only, development keys).
[engine]
environment = "development"
state_dir = "{state}"
shutdown_grace = "5s"

[keys]
provider = "development"

[[listener]]
name = "integration"
kind = "mllps"
address = "127.0.0.1:{mllps_port}"

[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
allowed_clients = ["CN=demo-ehr"]

[[listener]]
name = "legacy"
kind = "mllp"
address = "127.0.0.1:{mllp_port}"
allow = ["127.0.0.1/32"]
{destination}{route}"#,
        state = state_dir.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_cert.display(),
    );
    let path = state_dir.join("hl7edge.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn show(ack: &[u8]) -> String {
    String::from_utf8_lossy(ack)
        .split(['\r', '\n'])
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n      ")
}

pub async fn run(state_dir: Option<PathBuf>, serve: bool) -> anyhow::Result<()> {
    let state_dir = match state_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("hl7edge-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let state_dir = state_dir.canonicalize()?;
    println!("hl7edge demo: state folder {}", state_dir.display());
    let pki = devpki::generate(&state_dir.join("tls"), "demo-ehr")?;
    println!("  generated a demo CA, a server certificate (localhost) and a client certificate (CN=demo-ehr)");
    let (mllps_port, mllp_port) = (port_or_free(MLLPS_PORT), port_or_free(MLLP_PORT));
    let hospital = upstream::start(([127, 0, 0, 1], 0).into(), Some(&pki), true).await?;
    println!(
        "  started a built-in \"central hospital\" receiver (MLLPS, mutual TLS) on {}",
        hospital.addr
    );
    let config_path = write_config(
        &state_dir,
        &pki,
        mllps_port,
        mllp_port,
        Forward::Tls(hospital.addr),
    )?;
    let settings = Settings::load(&config_path)?;
    println!("  configuration {}", config_path.display());

    let engine = Engine::start(&settings).await?;
    let addr = engine
        .addr("integration")
        .context("the integration listener did not bind")?;
    println!("  engine up: MLLPS (mutual TLS) on {addr}, plaintext MLLP for 127.0.0.1 on port {mllp_port}");
    println!("  route: every message type -> destination \"hospital\"\n");

    let connector = TlsConnector::from(devpki::client_config(&pki)?);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the demo engine")?;
    let mut client = MllpClient::new(tls);
    println!("1. The clinic's EHR sends; each ACK comes only after the message is fsync'd:\n");
    for (label, msg) in samples::demo_messages() {
        let ack = client.exchange(msg.as_bytes()).await?;
        println!("  -> {label}\n  <- {}\n", show(&ack));
    }
    drop(client);

    // Forwarding runs on its own; wait (bounded) until the queue has drained.
    let ctx = engine.control().clone();
    let dests = vec!["hospital".to_string()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let report = loop {
        let report = crate::control::status_report(
            &ctx.reader,
            &dests,
            Some((&ctx.statuses, &ctx.live)),
            ctx.quota,
        )
        .map_err(anyhow::Error::msg)?;
        let drained = report
            .destinations
            .iter()
            .all(|d| d.queue.depth == 0 && d.live.as_ref().is_some_and(|l| l.delivered > 0));
        if drained || std::time::Instant::now() >= deadline {
            break report;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The context holds a store handle: the engine's writer stops only once every handle is gone.
    drop(ctx);
    println!("2. Queued and forwarded: the hospital acknowledged, in order:");
    for (ty, ctrl) in hospital
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        println!("  hospital <- {ty:<20} control ID {ctrl}");
    }
    println!("\n3. hl7edge queue status (figures from the running engine):\n");
    print!("{}", crate::control::render_status(&report));
    println!();

    let c = Arc::clone(&engine.counters);
    if serve {
        println!("Send your own (Ctrl-C to stop):");
        print_howto(&pki, mllps_port, mllp_port);
        println!(
            "  and watch the queue:\n    hl7edge queue status --config {}",
            config_path.display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    engine.shutdown().await;
    drop(hospital);
    let snap = c.snapshot();
    let get = |n: &str| {
        snap.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    println!(
        "Acknowledged and durably stored: {} new, {} duplicate, {} rejected with AR.",
        get("messages_accepted"),
        get("messages_duplicate"),
        get("messages_rejected")
    );
    let store = crate::store::Store::open(&settings.store)?;
    println!(
        "Stored in {} (bodies AES-256-GCM encrypted; metadata only below; delivered messages are kept for the retention period):",
        settings.store.path.display()
    );
    let reader = store.reader();
    for (id, m) in reader.list()? {
        println!(
            "  #{id}  {:<8} {:<16} from {}^{}  control ID {}",
            m.listener, m.message_type, m.sending_application, m.sending_facility, m.control_id
        );
    }
    audited(&settings, crate::audit::cli::Source::Store(reader))?;
    if !serve {
        println!("\nTo keep the demo running and send your own messages: hl7edge demo --serve");
        print_howto(&pki, mllps_port, mllp_port);
    }
    Ok(())
}

/// 4. The audit trail of the run, and its verification.
fn audited(settings: &Settings, src: crate::audit::cli::Source) -> anyhow::Result<()> {
    use crate::audit::cli;
    println!(
        "\n4. Audited: each step is a hash-chained record with the MRN as a keyed token \
         (hl7edge audit search|export|verify):\n"
    );
    let mut out = std::io::stdout().lock();
    cli::search(&src, &cli::Filter::default(), &mut out).map_err(anyhow::Error::msg)?;
    drop(out);
    let mut sealer = crate::keys::open_sealer(&settings.keys)?;
    let (_, key) = crate::keys::load_current(
        sealer.as_mut(),
        &settings.state_dir,
        crate::keys::KeyKind::Audit,
    )?;
    let public = crate::audit::AuditKeys::derive(&key).verifying_key();
    let report = cli::verify(&src, public).map_err(anyhow::Error::msg)?;
    println!("\n  hl7edge audit verify: {}", cli::render_report(&report));
    Ok(())
}

fn print_howto(pki: &devpki::DevPki, mllps_port: u16, mllp_port: u16) {
    println!(
        r#"  over MLLPS with openssl (mutual TLS):
    (printf '\x0b'; printf 'MSH|^~\\&|ME|CLINIC|HL7EDGE|HOSP|20260101120000||ADT^A04^ADT_A01|MYMSG1|P|2.5.1\rPID|1||12345^^^CLINIC^MR||TEST^PATIENT\r'; printf '\x1c\r'; sleep 1) \
      | openssl s_client -quiet -connect 127.0.0.1:{mllps_port} -CAfile {ca} -cert {cert} -key {key}
  over plaintext MLLP from 127.0.0.1 with python-hl7 (pip install hl7):
    mllp_send --loose -p {mllp_port} -f message.hl7 127.0.0.1
  over plaintext MLLP with socat:
    (printf '\x0b'; cat message.hl7; printf '\x1c\r') | socat -t2 - TCP:127.0.0.1:{mllp_port}"#,
        ca = pki.ca_cert.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    );
}
