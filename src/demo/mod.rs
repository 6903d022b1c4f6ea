//! `hl7edge demo`: a complete local instance on loopback with generated certificates, the
//! development key sealer and a state folder it creates; it sends sample messages over MLLPS
//! with a client certificate, prints their ACKs, and tells how to send your own.

pub mod samples;

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

/// Writes the demo configuration into `state_dir` and returns its path.
pub fn write_config(
    state_dir: &std::path::Path,
    pki: &devpki::DevPki,
    mllps_port: u16,
    mllp_port: u16,
) -> anyhow::Result<PathBuf> {
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
"#,
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
    let config_path = write_config(&state_dir, &pki, mllps_port, mllp_port)?;
    let settings = Settings::load(&config_path)?;
    println!("  configuration {}", config_path.display());

    let engine = Engine::start(&settings).await?;
    let addr = engine
        .addr("integration")
        .context("the integration listener did not bind")?;
    println!("  engine up: MLLPS (mutual TLS) on {addr}, plaintext MLLP for 127.0.0.1 on port {mllp_port}\n");

    let connector = TlsConnector::from(devpki::client_config(&pki)?);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the demo engine")?;
    let mut client = MllpClient::new(tls);
    for (label, msg) in samples::demo_messages() {
        let ack = client.exchange(msg.as_bytes()).await?;
        println!("  -> {label}\n  <- {}\n", show(&ack));
    }
    drop(client);

    let c = Arc::clone(&engine.counters);
    if serve {
        println!("Send your own (Ctrl-C to stop):");
        print_howto(&pki, mllps_port, mllp_port);
        let _ = tokio::signal::ctrl_c().await;
    }
    engine.shutdown().await;
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
        "Stored in {} (bodies AES-256-GCM encrypted; metadata only below):",
        settings.store.path.display()
    );
    for (id, m) in store.reader().list()? {
        println!(
            "  #{id}  {:<8} {:<16} from {}^{}  control ID {}",
            m.listener, m.message_type, m.sending_application, m.sending_facility, m.control_id
        );
    }
    if !serve {
        println!("\nTo keep the demo running and send your own messages: hl7edge demo --serve");
        print_howto(&pki, mllps_port, mllp_port);
    }
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
