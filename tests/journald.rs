//! The engine's logs and audit records in a real systemd-journald, started by this test: each
//! record arrives with its stable MESSAGE_ID and fields, alerts at priority alert, and no PHI
//! canary is in any journal file (raw, or decompressed through `journalctl -o export`).
//!
//! Its own test binary: while journald runs, every engine on this machine logs to it, so no
//! other test may run beside it (cargo runs test binaries one after another).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const JOURNALD: &str = "/lib/systemd/systemd-journald";
const SOCKET_DIR: &str = "/run/systemd/journal";
const JOURNAL_DIR: &str = "/run/log/journal";

/// A journald this test started; killed by PID and its sockets and files removed on drop.
struct Journald(Child);

impl Journald {
    fn start(scratch: &Path) -> Journald {
        assert!(
            Path::new(JOURNALD).exists(),
            "{JOURNALD} missing: tests/run.sh installs systemd"
        );
        // A stale socket from a killed run answers ECONNREFUSED; nothing listens behind it.
        let _ = std::fs::remove_dir_all(SOCKET_DIR);
        let _ = std::fs::remove_dir_all(JOURNAL_DIR);
        let notify = scratch.join("journald-notify.sock");
        let sock = UnixDatagram::bind(&notify).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let child = Command::new(JOURNALD)
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let j = Journald(child);
        let mut buf = [0u8; 512];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => break,
                Ok(_) => continue,
                Err(e) => panic!("systemd-journald not ready: {e}"),
            }
        }
        assert!(Path::new(SOCKET_DIR).join("socket").exists());
        j
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(SOCKET_DIR);
        let _ = std::fs::remove_dir_all(JOURNAL_DIR);
    }
}

fn journal_entries() -> Vec<serde_json::Value> {
    let _ = Command::new("journalctl").arg("--sync").output();
    let out = Command::new("journalctl")
        .args([
            "-D",
            JOURNAL_DIR,
            "-o",
            "json",
            "--no-pager",
            "SYSLOG_IDENTIFIER=hl7edge",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn audit_records_reach_journald_with_message_ids_and_no_phi() {
    let scratch = tempfile::tempdir().unwrap();
    let journald = Journald::start(scratch.path());
    let mut inst = Instance::new("", "");
    let text = std::fs::read_to_string(&inst.config).unwrap()
        + "\n[audit]\njournal_messages = true\n\
           [alerts]\nfailed_auth = { threshold = 1, window = \"1m\" }\n";
    std::fs::write(&inst.config, text).unwrap();
    inst.start();

    let canaries = ["JMRNCANARY77", "JNAMECANARY77", "JOBXCANARY77"];
    let msg = format!(
        "MSH|^~\\&|LAB|NORTHCLINIC|HL7EDGE|HOSP|20261203101500||ORU^R01^ORU_R01|JRNL1|P|2.5.1\r\
         PID|1||{}^^^NORTHCLINIC^MR||{}^JANE||19800101|F\r\
         OBR|1||LAB1|NOTE^Note^L|||20261203100000\r\
         OBX|1|TX|NOTE^Note^L||{} patient reports pain|||N|||F\r",
        canaries[0], canaries[1], canaries[2]
    );
    let mut c = MllpConn::connect(inst.plain_addr());
    assert_eq!(ack_code(&c.send(&msg)).as_deref(), Some("AA"));
    // An unparseable message: its NAK is audited too.
    drop(c);
    let bad = format!("PID|1||{}\r", canaries[0]);
    let mut raw = std::net::TcpStream::connect(inst.plain_addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    std::io::Write::write_all(&mut raw, &frame(bad.as_bytes())).unwrap();
    // No header to answer from: the connection is closed without an ACK.
    assert_eq!(read_frame(&mut raw), None);
    // A failed TLS handshake: a security event, and at threshold 1 an alert.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", inst.mllps_port)).unwrap();
        s.write_all(b"this is not a TLS client hello\r\n").unwrap();
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    }
    assert_eq!(inst.stop(), Some(0));

    let id = |event: &str| hl7edge::audit::message_id(event);
    let entries = wait_for(&inst, "the audit records in the journal", 30, || {
        let e = journal_entries();
        e.iter()
            .any(|x| x["MESSAGE_ID"] == id("alert.failed_auth").as_str())
            .then_some(e)
    });
    let find = |event: &str| {
        entries
            .iter()
            .find(|x| x["MESSAGE_ID"] == id(event).as_str())
            .unwrap_or_else(|| panic!("no {event} in the journal: {entries:#?}"))
    };
    let rx = find("message.received");
    assert_eq!(rx["AUDIT_EVENT"], "message.received");
    assert_eq!(rx["CONTROL_ID"], "JRNL1");
    assert_eq!(rx["LISTENER"], "legacy");
    assert_eq!(rx["MESSAGE_TYPE"], "ORU^R01^ORU_R01");
    assert!(rx["MRN_TOKEN"].as_str().unwrap().starts_with("t1:"));
    assert!(rx["AUDIT_SEQ"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(rx["PRIORITY"], "5", "an audit record is a notice");
    let rejected = find("message.rejected");
    assert_eq!(rejected["PRIORITY"], "4");
    assert_eq!(rejected["OUTCOME"], "closed");
    let failed = find("auth.failed");
    assert_eq!(failed["LISTENER"], "integration");
    let alert = find("alert.failed_auth");
    assert_eq!(alert["PRIORITY"], "1", "alerts at priority alert");
    assert!(find("engine.started")["MESSAGE"].is_string());
    find("audit.checkpoint");
    // The same record in the chain and in the journal.
    let chain = inst.cli(&["audit", "export", "--control-id", "JRNL1"]);
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&chain.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rx["AUDIT_SEQ"], first["seq"].to_string().as_str());
    assert_eq!(rx["MRN_TOKEN"], first["mrn_token"]);

    // No canary anywhere in the journal: its files raw, and every field decompressed.
    let mut files = Vec::new();
    files_under(Path::new(JOURNAL_DIR), &mut files);
    assert!(!files.is_empty());
    let export = Command::new("journalctl")
        .args(["-D", JOURNAL_DIR, "-o", "export", "--no-pager"])
        .output()
        .unwrap()
        .stdout;
    assert!(
        export.windows(5).any(|w| w == b"JRNL1"),
        "the export holds the records"
    );
    for c in canaries {
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            assert!(
                !bytes.windows(c.len()).any(|w| w == c.as_bytes()),
                "{c} in {}",
                f.display()
            );
        }
        assert!(
            !export.windows(c.len()).any(|w| w == c.as_bytes()),
            "{c} in the journal"
        );
    }
    drop(journald);
    assert!(!Path::new(SOCKET_DIR).exists());
}
