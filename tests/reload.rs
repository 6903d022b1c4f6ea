//! Certificate rotation without a restart: after SIGHUP new connections get the new files,
//! connections already open keep working, and a reload that cannot load a file changes
//! nothing. The TLS peer is openssl s_client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// An `openssl s_client` connection kept open: frames go to its stdin, ACKs come back on its
/// stdout. It verifies the server against `ca` and presents the client certificate.
struct Session {
    child: Child,
    stdin: ChildStdin,
    /// What openssl printed, chunk by chunk, read on a thread so a silent engine fails the
    /// test instead of hanging it.
    stdout: mpsc::Receiver<Vec<u8>>,
}

impl Session {
    fn open(port: u16, ca: &Path, cert: &Path, key: &Path) -> Session {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(ca)
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = read_on_a_thread(child.stdout.take().unwrap());
        Session {
            child,
            stdin,
            stdout,
        }
    }

    fn with(port: u16, pki: &DevPki) -> Session {
        Self::open(port, &pki.ca_cert, &pki.client_cert, &pki.client_key)
    }

    /// Sends one message; its ACK, or `None` when the connection ended first (a refused
    /// handshake ends it).
    fn exchange(&mut self, msg: &str) -> Option<String> {
        if self.stdin.write_all(&frame(msg.as_bytes())).is_err() || self.stdin.flush().is_err() {
            return None;
        }
        let mut got = Vec::new();
        while !(got.windows(4).any(|w| w == b"MSA|") && got.contains(&0x1c)) {
            match self.stdout.recv_timeout(Duration::from_secs(30)) {
                Ok(chunk) => got.extend_from_slice(&chunk),
                // The connection ended (openssl exited).
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no ACK and no close in 30 s"),
            }
        }
        Some(String::from_utf8_lossy(&got).into_owned())
    }
}

fn read_on_a_thread(mut out: ChildStdout) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn accepted(ack: Option<String>, id: &str) -> bool {
    ack.is_some_and(|a| a.contains(&format!("MSA|AA|{id}")))
}

#[test]
fn sighup_rotates_listener_certificates_without_dropping_open_connections() {
    let mut inst = Instance::new("", "");
    inst.start();
    let port = inst.mllps_port;
    let old = inst.pki.clone();
    let mut before = Session::with(port, &old);
    assert!(accepted(before.exchange(&adt("RLD1", "A")), "RLD1"));

    // A new CA, server certificate and client certificate, as a provisioning bundle brings.
    let new = devpki::generate(&inst.dir.path().join("tls-new"), "rotated-ehr").unwrap();
    assert!(
        !accepted(
            Session::with(port, &new).exchange(&adt("RLD2", "B")),
            "RLD2"
        ),
        "the new certificates must not work before the reload"
    );

    // Installed over the files the configuration names, then SIGHUP.
    let old_ca = inst.dir.path().join("old-ca.pem");
    std::fs::copy(&old.ca_cert, &old_ca).unwrap();
    for (from, to) in [
        (&new.ca_cert, &old.ca_cert),
        (&new.server_cert, &old.server_cert),
        (&new.server_key, &old.server_key),
    ] {
        std::fs::copy(from, to).unwrap();
    }
    inst.reload();
    assert!(
        accepted(
            Session::with(port, &new).exchange(&adt("RLD3", "C")),
            "RLD3"
        ),
        "{}",
        inst.log()
    );
    // The connection opened before the reload goes on with its own configuration.
    assert!(accepted(before.exchange(&adt("RLD4", "D")), "RLD4"));
    // New connections with the old certificates are refused: the old CA is gone. The engine
    // itself refuses a client certificate from the old CA (this client trusts the new server).
    assert!(!accepted(
        Session::open(port, &old_ca, &old.client_cert, &old.client_key).exchange(&adt("RLD5", "E")),
        "RLD5"
    ));
    assert!(!accepted(
        Session::open(port, &new.ca_cert, &old.client_cert, &old.client_key)
            .exchange(&adt("RLD7", "G")),
        "RLD7"
    ));

    // A reload that cannot read a file changes nothing and says what failed: here through
    // `hl7edge tls reload` (systemd's ExecReload), which answers once done.
    std::fs::write(&old.server_key, "not a key\n").unwrap();
    let out = inst.cli(&["tls", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(
        err.contains("listener integration")
            && err.contains(&old.server_key.display().to_string())
            && err.contains("nothing changed"),
        "{err}"
    );
    assert!(accepted(
        Session::with(port, &new).exchange(&adt("RLD6", "F")),
        "RLD6"
    ));
    drop(before);
    inst.stop();
    let log = inst.log();
    assert!(log.contains("TLS reload failed; nothing changed"), "{log}");
    assert!(log.contains("listener integration"), "{log}");

    let ids = inst.stored_control_ids();
    for id in ["RLD1", "RLD3", "RLD4", "RLD6"] {
        assert!(ids.contains(&id.to_string()), "{id} missing from {ids:?}");
    }
    for id in ["RLD2", "RLD5", "RLD7"] {
        assert!(!ids.contains(&id.to_string()), "{id} stored: {ids:?}");
    }

    let out = inst.cli(&["audit", "export"]);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["event"].as_str().is_some_and(|e| e.starts_with("tls.")))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["event"], "tls.reloaded");
    assert_eq!(events[0]["actor"], "SIGHUP");
    assert_eq!(events[1]["event"], "tls.reload_failed");
    let failed = events[1].to_string();
    assert!(failed.contains("listener integration"), "{failed}");
    // The command's caller, as the control socket saw it.
    assert!(
        events[1]["actor"].as_str().unwrap().starts_with("uid:"),
        "{failed}"
    );
}

#[test]
fn sighup_reloads_a_destination_ca_and_delivery_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // The hospital's server certificate now chains to a CA the box does not trust yet.
    let hospital = devpki::generate(&dir.path().join("hospital"), "unused").unwrap();
    let retired = devpki::generate(&dir.path().join("retired"), "unused").unwrap();
    let up = Upstream::python_hl7_tls(&dir.path().join("up.log"), 0, &hospital, false, &[]);
    let ca = dir.path().join("hospital-ca.pem");
    std::fs::copy(&retired.ca_cert, &ca).unwrap();
    let extra =
        mllps_destination("hospital", up.port, &ca, "") + &route("all", &[], &[], &["hospital"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ack = send_plain(
        inst.plain_addr(),
        &hl7_message("EHR", "ADT^A01^ADT_A01", "RLDF1"),
    )
    .unwrap();
    assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
    wait_for(&inst, "a TLS failure toward the hospital", 30, || {
        let d = inst.dest_status("hospital");
        let e = d["live"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_lowercase();
        e.contains("certificate").then_some(())
    });
    assert!(up.received().is_empty());

    std::fs::copy(&hospital.ca_cert, &ca).unwrap();
    let out = inst.cli(&["tls", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "TLS reloaded: listeners integration; destinations hospital"
    );
    let aa = wait_for(&inst, "delivery after the reload", 60, || {
        let aa = ids_with(&up.received(), "AA");
        (!aa.is_empty()).then_some(aa)
    });
    assert_eq!(aa, ["RLDF1"]);

    // Retiring the CA again reaches the connection the forwarder keeps open as well: the next
    // message is not sent on it, and the new connection fails its handshake.
    let failed_before = inst.dest_status("hospital")["live"]["last_error_ms"]
        .as_u64()
        .unwrap();
    std::fs::copy(&retired.ca_cert, &ca).unwrap();
    assert!(inst.cli(&["tls", "reload"]).status.success());
    let ack = send_plain(
        inst.plain_addr(),
        &hl7_message("EHR", "ADT^A01^ADT_A01", "RLDF2"),
    )
    .unwrap();
    assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
    wait_for(&inst, "a new TLS failure toward the hospital", 30, || {
        let ms = inst.dest_status("hospital")["live"]["last_error_ms"].as_u64()?;
        (ms > failed_before).then_some(())
    });
    assert_eq!(ids_with(&up.received(), "AA"), ["RLDF1"]);
    assert_eq!(inst.dest_status("hospital")["depth"], 1);
    inst.stop();
    assert!(
        inst.log()
            .contains("TLS certificates, keys and CAs reloaded"),
        "{}",
        inst.log()
    );
}
