//! Intake over MLLP and MLLPS with third-party clients (python-hl7, openssl, socat), and the
//! negative cases: TLS 1.1, no client certificate, refused source, oversized, garbage, truncated
//! and idle connections. Each test starts the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn write_messages(inst: &Instance, name: &str, msgs: &[String]) -> std::path::PathBuf {
    let p = inst.dir.path().join(name);
    let text: Vec<String> = msgs.iter().map(|m| m.replace('\r', "\n")).collect();
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

#[test]
fn python_hl7_mllp_send_plain_gets_aa_and_messages_are_stored() {
    let mut inst = Instance::new("", "");
    inst.start();
    let file = write_messages(
        &inst,
        "msgs.hl7",
        &[adt("PLAIN1", "ALPHA"), adt("PLAIN2", "BETA")],
    );
    let out = mllp_send(inst.mllp_port, &file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mllp_send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("MSA|AA|PLAIN").count(), 2, "ACKs: {stdout}");
    assert_eq!(inst.stop(), Some(0), "SIGTERM must exit 0\n{}", inst.log());
    let ids = inst.stored_control_ids();
    assert!(
        ids.contains(&"PLAIN1".to_string()) && ids.contains(&"PLAIN2".to_string()),
        "{ids:?}"
    );
}

#[test]
fn python_hl7_asyncio_over_mutual_tls_gets_aa() {
    let mut inst = Instance::new("", "");
    inst.start();
    let file = write_messages(
        &inst,
        "msgs.hl7",
        &[
            adt("TLS1", "ALPHA"),
            adt("TLS2", "BETA"),
            adt("TLS1", "ALPHA"),
        ],
    );
    let out = Command::new(venv().join("bin/python"))
        .arg(peer_script("send_tls.py"))
        .args(["127.0.0.1", &inst.mllps_port.to_string()])
        .arg(&file)
        .arg("--ca")
        .arg(&inst.pki.ca_cert)
        .arg("--cert")
        .arg(&inst.pki.client_cert)
        .arg("--key")
        .arg(&inst.pki.client_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["AA TLS1", "AA TLS2", "AA TLS1"]
    );
    inst.stop();
    // The duplicate is acknowledged again but stored once.
    let ids = inst.stored_control_ids();
    assert_eq!(ids.iter().filter(|i| *i == "TLS1").count(), 1, "{ids:?}");
}

fn openssl(inst: &Instance, extra: &[&str], with_cert: bool, payload: &[u8]) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-connect",
        &format!("127.0.0.1:{}", inst.mllps_port),
        "-CAfile",
    ])
    .arg(&inst.pki.ca_cert)
    .args(extra);
    if with_cert {
        cmd.arg("-cert")
            .arg(&inst.pki.client_cert)
            .arg("-key")
            .arg(&inst.pki.client_key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(payload);
    let _ = stdin.flush();
    // Read until a whole ACK frame arrives or the server closes (then openssl exits); stdin
    // stays open meanwhile so openssl does not hang up first.
    let mut stdout = child.stdout.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut stdout, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
        if text.windows(4).any(|w| w == b"MSA|") && text.contains(&0x1c) {
            break;
        }
    }
    drop(stdin);
    let _ = child.kill();
    let status = child.wait().unwrap();
    (
        status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    )
}
#[test]
fn openssl_s_client_with_certificate_gets_aa_and_tls11_or_no_certificate_is_refused() {
    let mut inst = Instance::new("", "");
    inst.start();
    let payload = frame(adt("OSSL1", "GAMMA").as_bytes());
    let (_, out) = openssl(&inst, &[], true, &payload);
    assert!(out.contains("MSA|AA|OSSL1"), "openssl got: {out:?}");

    let (_, out) = openssl(
        &inst,
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        true,
        &frame(adt("OSSL11", "X").as_bytes()),
    );
    assert!(!out.contains("MSA|"), "TLS 1.1 must get nothing: {out:?}");
    let (_, out) = openssl(&inst, &[], false, &frame(adt("OSSLNOCERT", "X").as_bytes()));
    assert!(
        !out.contains("MSA|"),
        "no client certificate must get nothing: {out:?}"
    );
    inst.stop();
    let log = inst.log();
    assert!(log.matches("TLS handshake failed").count() >= 2, "{log}");
    let ids = inst.stored_control_ids();
    assert!(ids.contains(&"OSSL1".to_string()));
    assert!(!ids.contains(&"OSSL11".to_string()) && !ids.contains(&"OSSLNOCERT".to_string()));
}

#[test]
fn socat_plain_and_client_identity_allow_list() {
    let mut inst = Instance::new("allowed_clients = [\"CN=someone-else\"]", "");
    inst.start();
    let mut child = Command::new("socat")
        .args(["-t5", "-", &format!("TCP:127.0.0.1:{}", inst.mllp_port)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&frame(adt("SOCAT1", "DELTA").as_bytes()))
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("MSA|AA|SOCAT1"));
    // A valid certificate whose identity is not in allowed_clients gets no ACK.
    let (_, out) = openssl(&inst, &[], true, &frame(adt("NOTALLOWED", "X").as_bytes()));
    assert!(!out.contains("MSA|"), "{out:?}");
    inst.stop();
    assert!(inst.log().contains("identity not in allowed_clients"));
}

#[test]
fn source_outside_allow_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("tls"), "t").unwrap();
    let (a, b) = (free_port(), free_port());
    let text = config_text(dir.path(), &pki, a, b, "", "")
        .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"10.99.0.0/16\"]");
    let mut inst = Instance::with_config(dir, pki, a, b, &text);
    inst.start();
    assert_eq!(send_plain(inst.plain_addr(), &adt("REFUSED1", "X")), None);
    inst.stop();
    assert!(
        inst.log().contains("source not in the allow-list"),
        "{}",
        inst.log()
    );
    assert!(!inst.stored_control_ids().contains(&"REFUSED1".to_string()));
}

#[test]
fn oversized_message_gets_ar_and_the_connection_closes() {
    let mut inst = Instance::new("", "");
    inst.start();
    let mut big = adt("BIG1", "X");
    big.push_str(&format!("NTE|1||{}\r", "A".repeat(70_000)));
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(&frame(big.as_bytes()));
    let ack = String::from_utf8_lossy(&read_frame(&mut s).expect("an AR")).into_owned();
    assert_eq!(ack_code(&ack).as_deref(), Some("AR"), "{ack}");
    assert!(ack.contains("BIG1") && ack.contains("ERR|"), "{ack}");
    assert!(
        read_frame(&mut s).is_none(),
        "connection must close after an oversized frame"
    );
    // Other peers are unaffected.
    assert_eq!(
        ack_code(&send_plain(inst.plain_addr(), &adt("AFTERBIG", "X")).unwrap()).as_deref(),
        Some("AA")
    );
    inst.stop();
    assert!(!inst.stored_control_ids().contains(&"BIG1".to_string()));
}

#[test]
fn garbage_truncated_and_unparseable_input_never_stalls_the_listener() {
    let mut inst = Instance::new("", "");
    inst.start();
    // Garbage inside a frame with no MSH: no ACK can be built, the connection closes.
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&frame(b"\x00\xffthis is not hl7")).unwrap();
    assert!(read_frame(&mut s).is_none());
    // Bytes outside frames are discarded; the framed message after them is acknowledged.
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut bytes = b"noise before the frame\r\n".to_vec();
    bytes.extend(frame(adt("AFTERNOISE", "X").as_bytes()));
    s.write_all(&bytes).unwrap();
    assert_eq!(
        ack_code(&String::from_utf8_lossy(&read_frame(&mut s).unwrap())).as_deref(),
        Some("AA")
    );
    // An MSH without MSH-9 gets AR with an ERR naming it.
    let bad = "MSH|^~\\&|LAB|CLINIC|HL7EDGE|HOSP|20261203|||NOTYPE1|P|2.5.1\rPID|1||123\r";
    let ack = send_plain(inst.plain_addr(), bad).unwrap();
    assert_eq!(ack_code(&ack).as_deref(), Some("AR"), "{ack}");
    assert!(
        ack.contains("MSA|AR|NOTYPE1") && ack.contains("ERR|"),
        "{ack}"
    );
    // A truncated frame (peer closes mid-message) is not acknowledged nor stored.
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    let half = adt("TRUNC1", "X");
    s.write_all(&[&[0x0bu8][..], &half.as_bytes()[..40]].concat())
        .unwrap();
    drop(s);
    assert_eq!(
        ack_code(&send_plain(inst.plain_addr(), &adt("AFTERTRUNC", "X")).unwrap()).as_deref(),
        Some("AA")
    );
    inst.stop();
    let ids = inst.stored_control_ids();
    assert!(!ids.contains(&"TRUNC1".to_string()) && !ids.contains(&"NOTYPE1".to_string()));
    assert!(ids.contains(&"AFTERTRUNC".to_string()) && ids.contains(&"AFTERNOISE".to_string()));
    let log = inst.log();
    assert!(
        log.contains("Bytes outside MLLP frames discarded")
            && log.contains("Connection closed inside a frame"),
        "{log}"
    );
}

#[test]
fn idle_connection_is_closed() {
    let mut inst = Instance::new("", "idle_timeout = \"1s\"");
    inst.start();
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = std::time::Instant::now();
    assert!(
        read_frame(&mut s).is_none(),
        "the engine must close an idle connection"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    inst.stop();
    assert!(inst.log().contains("Idle connection closed"));
}

#[test]
fn mllp_release2_answers_with_commit_blocks() {
    let mut inst = Instance::new("", "mllp_release2 = true");
    inst.start();
    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&frame(adt("R2ONE", "X").as_bytes())).unwrap();
    assert_eq!(read_frame(&mut s), Some(vec![0x06]));
    s.write_all(&frame(b"MSH|^~\\&|A|B|C|D|2026||||R2BAD|P|2.5\r"))
        .unwrap();
    assert_eq!(read_frame(&mut s), Some(vec![0x15]));
    inst.stop();
}

#[test]
fn bad_config_exits_64_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[keys]\nprovider = \"development\"\n[engine]\nenvironment = \"development\"\n[[listener]]\nname = \"i\"\nkind = \"mllps\"\naddress = \"0.0.0.0:2575\"\n[listener.tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n").unwrap();
    for sub in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args([sub, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{sub}: {err}");
        assert!(
            err.contains("bad.toml") && err.contains("listener[0].interface"),
            "{err}"
        );
    }
    std::fs::write(&cfg, "[keys]\nprovider = \"development\"\nbogus = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64));
    assert!(err.contains("bad.toml") && err.contains("bogus"), "{err}");
}

#[test]
fn connections_over_the_listener_limit_are_closed_without_affecting_others() {
    let mut inst = Instance::new("", "max_connections = 1");
    inst.start();
    let mut first = TcpStream::connect(inst.plain_addr()).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    first
        .write_all(&frame(adt("LIMIT1", "X").as_bytes()))
        .unwrap();
    assert_eq!(
        ack_code(&String::from_utf8_lossy(&read_frame(&mut first).unwrap())).as_deref(),
        Some("AA")
    );
    // The first connection holds the only slot: the second is closed unanswered.
    assert_eq!(send_plain(inst.plain_addr(), &adt("LIMIT2", "X")), None);
    // The first one still works.
    first
        .write_all(&frame(adt("LIMIT3", "X").as_bytes()))
        .unwrap();
    assert_eq!(
        ack_code(&String::from_utf8_lossy(&read_frame(&mut first).unwrap())).as_deref(),
        Some("AA")
    );
    drop(first);
    inst.stop();
    assert!(inst.log().contains("connection limit"));
    let ids = inst.stored_control_ids();
    assert!(ids.contains(&"LIMIT3".to_string()) && !ids.contains(&"LIMIT2".to_string()));
}

/// Waits up to `secs` for `child` to exit; kills it and returns `None` when it does not.
fn wait_exit(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    for _ in 0..secs * 10 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn sigterm_closes_a_connection_stuck_in_its_handshake_after_the_grace_period() {
    let mut inst = Instance::new("", "");
    // The TLS listener waits a whole hour for a handshake: without the grace period's end
    // closing it, SIGTERM would wait that long.
    let text = std::fs::read_to_string(&inst.config).unwrap().replace(
        "max_message_size = 65536\n\n[listener.tls]",
        "max_message_size = 65536\nidle_timeout = \"1h\"\n\n[listener.tls]",
    );
    std::fs::write(&inst.config, text).unwrap();
    inst.start();
    // A client that connects and never says a word.
    let silent = TcpStream::connect(("127.0.0.1", inst.mllps_port)).unwrap();
    // The same listener still serves others meanwhile.
    let (_, out) = openssl(&inst, &[], true, &frame(adt("GRACE1", "X").as_bytes()));
    assert!(out.contains("MSA|AA|GRACE1"), "openssl got: {out:?}");
    let pid = nix::unistd::Pid::from_raw(inst.pid() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let status = std::thread::scope(|scope| {
        scope.spawn(|| tx.send(inst.stop()));
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(code) => code,
            Err(_) => {
                // Still running a minute after SIGTERM: end it so the test can report.
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                None
            }
        }
    });
    drop(silent);
    assert_eq!(
        status,
        Some(0),
        "SIGTERM must end the engine (exit 0) once the grace period is over\n{}",
        inst.log()
    );
    assert!(
        inst.log()
            .contains("still open when the shutdown grace period ended"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_lost_message_key_refuses_start_instead_of_making_stored_messages_unreadable() {
    let mut inst = Instance::new("", "");
    inst.start();
    assert_eq!(
        ack_code(&send_plain(inst.plain_addr(), &adt("LOSTKEY1", "X")).unwrap()),
        Some("AA".into())
    );
    assert_eq!(inst.stop(), Some(0));
    let keys = inst.dir.path().join("state/keys");
    let mut removed = 0;
    for e in std::fs::read_dir(&keys).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("message-")
        {
            std::fs::remove_file(p).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1);
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&inst.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, 30).expect("the engine must refuse to start");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(71), "{err}");
    assert!(err.contains("lost or replaced"), "{err}");
    let regenerated = std::fs::read_dir(&keys).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("message-")
    });
    assert!(!regenerated, "no new message key may be generated");
}
