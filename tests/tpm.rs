//! Promises 3 and 7 against a real TPM 2.0 (swtpm, one per test on its own ports, state in a
//! tempdir): keys are sealed under a PCR 7 policy and unseal again after a TPM restart; an
//! extended PCR 7 or a blob from another TPM stops `hl7edge run` with exit 71 and an error that
//! names the key and the cause; no PHI canary and no key bytes are in any file the engine
//! wrote; messages stored before and after `keys rotate message` are all delivered, and
//! `keys rewrap` leaves no record under the old key id.
//!
//! swtpm readiness is `swtpm_ioctl -g` polled (bounded); the engine's is sd_notify READY.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A software TPM (swtpm) serving one test; killed by PID and reaped on drop.
struct Swtpm {
    child: Option<Child>,
    state: PathBuf,
    port: u16,
}

/// A port P with P+1 also free (swtpm's server and control ports): two consecutive ones from
/// `free_port`, which hands ports out in order.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let (p, q) = (free_port(), free_port());
        if q == p + 1 {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

impl Swtpm {
    /// A TPM with its state in `state` (created when missing), on fresh ports.
    fn start(state: &Path) -> Swtpm {
        std::fs::create_dir_all(state).unwrap();
        let mut t = Swtpm {
            child: None,
            state: state.to_path_buf(),
            port: free_port_pair(),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", self.state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.port + 1
            ))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (apt-get install swtpm swtpm-tools; tests/run.sh does)");
        self.child = Some(child);
        let ctrl = format!("127.0.0.1:{}", self.port + 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("swtpm_ioctl")
                .args(["--tcp", &ctrl, "-g"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "swtpm on {ctrl} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process and starts it again with the same state and ports (a reboot keeps
    /// the seeds; PCRs start from their reset values).
    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Extends a PCR (sha256) with tpm2-tools, as a changed boot chain would.
    fn extend_pcr(&self, pcr: u8) {
        let out = Command::new("tpm2_pcrextend")
            .args(["-T", &self.tcti()])
            .arg(format!("{pcr}:sha256={}", "ab".repeat(32)))
            .env("TSS2_LOG", "all+NONE")
            .output()
            .expect("tpm2_pcrextend (apt-get install tpm2-tools)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The harness's configuration with production settings and the TPM sealer on `tpm`.
fn tpm_config(base: String, tpm: &Swtpm) -> String {
    let text = base
        .replace(
            "environment = \"development\"",
            "environment = \"production\"",
        )
        .replace(
            "[keys]\nprovider = \"development\"\n",
            &format!(
                "[keys]\nprovider = \"tpm\"\ntcti = \"{}\"\npcrs = [7]\npcr_bank = \"sha256\"\n",
                tpm.tcti()
            ),
        );
    assert!(text.contains("provider = \"tpm\""));
    text
}

/// An instance using `tpm`, with `extra` (destinations, routes) appended.
fn tpm_instance(tpm: &Swtpm, extra: &str) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("tls"), "test-gw").unwrap();
    let (a, b) = (free_port(), free_port());
    let text = tpm_config(config_text(dir.path(), &pki, a, b, "", ""), tpm) + extra;
    Instance::with_config(dir, pki, a, b, &text)
}

/// `hl7edge keys <args>`: exit code, stdout, stderr.
fn keys(inst: &Instance, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    let out = inst.cli(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keys_ok(inst: &Instance, args: &[&str]) -> String {
    let (code, out, err) = keys(inst, args);
    assert_eq!(code, 0, "hl7edge keys {args:?}: {out}{err}");
    out
}

/// `hl7edge run` expected to refuse: its exit code and stderr (bounded wait).
fn run_refused(inst: &Instance) -> (i32, String) {
    let err_path = inst.dir.path().join("refused.stderr");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&inst.config)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hl7edge run started although its keys should not unseal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

fn status_line<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find(|l| l.split('\t').next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} in keys status:\n{status}"))
}

#[test]
fn the_version_names_the_tpm_sealer_of_this_build() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("key sealers: tpm, development"), "{text}");
}

#[test]
fn keys_seal_in_the_tpm_unseal_after_its_restart_and_the_engine_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tpm = Swtpm::start(&tmp.path().join("tpm"));
    let mut inst = tpm_instance(&tpm, "");

    let out = keys_ok(&inst, &["init"]);
    for k in ["message-1", "audit-1", "disk-1", "tunnel-1"] {
        assert!(out.contains(&format!("{k}\tgenerated and sealed")), "{out}");
    }
    // Idempotent: nothing is replaced.
    let blob = std::fs::read(inst.dir.path().join("state/keys/message-1.sealed")).unwrap();
    let out = keys_ok(&inst, &["init"]);
    assert!(out.contains("message-1\texists"), "{out}");
    assert!(keys_ok(&inst, &["seal-disk"]).contains("disk-1\texists"));
    assert_eq!(
        std::fs::read(inst.dir.path().join("state/keys/message-1.sealed")).unwrap(),
        blob
    );
    let st = keys_ok(&inst, &["status"]);
    assert!(st.contains("TPM 2.0 at swtpm:"), "{st}");
    for k in ["message-1", "audit-1", "disk-1", "tunnel-1"] {
        let l = status_line(&st, k);
        assert!(
            l.contains("\tunseals") && l.contains("pcrs=sha256:7"),
            "{l}"
        );
    }
    let pubkey = keys_ok(&inst, &["tunnel-pubkey"]);
    assert_eq!(pubkey.trim().len(), 44, "{pubkey}");
    // The disk key goes to a pipe only: on a terminal (script(1) gives it one) it is refused.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{BIN} keys unseal-disk --config {}",
            inst.config.display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("refusing to write the disk key to a terminal"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Nor into a file, where it would stay in plaintext.
    let file = inst.dir.path().join("disk.key");
    let out = Command::new(BIN)
        .args(["keys", "unseal-disk", "--config"])
        .arg(&inst.config)
        .stdout(std::fs::File::create(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("anywhere but a pipe"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);

    inst.start();
    let ack = send_plain(inst.plain_addr(), &adt("TPM1", "DOE")).unwrap();
    assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
    assert!(inst.log().contains("storage key owner-primary-ecc-p256"));
    assert_eq!(inst.stop(), Some(0));

    // A reboot: same TPM seed, PCRs reset to the same boot state.
    tpm.restart();
    let st = keys_ok(&inst, &["status"]);
    assert!(status_line(&st, "message-1").contains("\tunseals"), "{st}");
    assert!(status_line(&st, "message-1").contains("records=1"), "{st}");
    assert_eq!(keys_ok(&inst, &["tunnel-pubkey"]), pubkey);
    inst.start();
    assert_eq!(inst.stop(), Some(0));
}

#[test]
fn changed_pcr7_refuses_start_with_exit_71_naming_the_message_key_and_pcr_7() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let inst = tpm_instance(&tpm, "");
    keys_ok(&inst, &["init"]);
    tpm.extend_pcr(7);

    let (code, err) = run_refused(&inst);
    assert_eq!(code, 71, "{err}");
    assert!(err.contains("message key"), "{err}");
    assert!(err.contains("PCR 7"), "{err}");
    assert!(!err.contains("ERROR:esys"), "libtss2 chatter: {err}");
    // No fallback: no new key was generated, the blob is untouched.
    let ids = std::fs::read_dir(inst.dir.path().join("state/keys"))
        .unwrap()
        .count();
    assert_eq!(ids, 4);
    let (code, out, err) = keys(&inst, &["status"]);
    assert_eq!(code, 71, "{out}{err}");
    assert!(status_line(&out, "disk-1").contains("PCR 7"), "{out}");
    let (code, _, err) = keys(&inst, &["unseal-disk"]);
    assert_eq!(code, 71, "{err}");
    assert!(err.contains("disk key") && err.contains("PCR 7"), "{err}");
}

#[test]
fn blob_from_another_tpm_refuses_start_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm_a = Swtpm::start(&tmp.path().join("tpm-a"));
    let a = tpm_instance(&tpm_a, "");
    keys_ok(&a, &["init"]);

    // A second box with a fresh TPM, given the first box's keys folder.
    let tpm_b = Swtpm::start(&tmp.path().join("tpm-b"));
    let b = tpm_instance(&tpm_b, "");
    let to = b.dir.path().join("state/keys");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(a.dir.path().join("state/keys")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let (code, err) = run_refused(&b);
    assert_eq!(code, 71, "{err}");
    assert!(err.contains("message key"), "{err}");
    assert!(err.contains("sealed by another TPM"), "{err}");

    // A damaged blob names the key and says so.
    std::fs::write(to.join("message-1.sealed"), b"{\"format\": 1}").unwrap();
    let (code, err) = run_refused(&b);
    assert_eq!(code, 71, "{err}");
    assert!(
        err.contains("message key") && err.contains("corrupt"),
        "{err}"
    );

    // No TPM at all.
    drop(tpm_b);
    let (code, err) = run_refused(&b);
    assert_eq!(code, 71, "{err}");
    assert!(err.contains("cannot open the TPM"), "{err}");
}

/// Every file under `root`, recursively.
fn files_under(root: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            files_under(&p, out);
        } else if meta.is_file() {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_phi_canary_and_no_key_bytes_in_any_file_the_engine_wrote() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let up = Upstream::python_hl7(&tmp.path().join("upstream.log"), 0, &[]);
    let extra = mllp_destination("hospital", up.port, "") + &route("all", &[], &[], &["hospital"]);
    let mut inst = tpm_instance(&tpm, &extra);
    keys_ok(&inst, &["init"]);
    inst.start();

    let tag = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut canaries = Vec::new();
    let mut conn = MllpConn::connect(inst.plain_addr());
    for i in 0..7 {
        if i == 5 {
            // The last two arrive at an engine that is then killed: their frames stay in the
            // write-ahead log, which the scan reads too.
            drop(conn);
            wait_for(&inst, "5 messages at the upstream", 30, || {
                (ids_with(&up.received(), "AA").len() >= 5).then_some(())
            });
            assert_eq!(inst.stop(), Some(0));
            inst.start();
            conn = MllpConn::connect(inst.plain_addr());
        }
        let (mrn, name, obx) = (
            format!("MRNCANARY{tag}X{i}"),
            format!("NAMECANARY{tag}X{i}"),
            format!("OBXCANARY{tag}X{i}"),
        );
        let msg = format!(
            "MSH|^~\\&|LAB|NORTHCLINIC|HL7EDGE|HOSP|20261203101500||ORU^R01^ORU_R01|CAN{i}|P|2.5.1\r\
             PID|1||{mrn}^^^NORTHCLINIC^MR||{name}^JANE||19800101|F\r\
             OBR|1||LAB{i}|NOTE^Note^L|||20261203100000\r\
             OBX|1|TX|NOTE^Note^L||{obx} patient reports pain|||N|||F\r"
        );
        let ack = conn.send(&msg);
        assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
        canaries.extend([mrn, name, obx]);
    }
    drop(conn);
    inst.kill9();
    // The log frames as kill -9 left them: the key commands below audit themselves into the
    // store, whose opening replays and clears the log, so the scan keeps a copy.
    let wal_copy = inst.dir.path().join("wal-after-kill9");
    std::fs::create_dir_all(&wal_copy).unwrap();
    for e in std::fs::read_dir(inst.dir.path().join("state/wal")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, wal_copy.join(p.file_name().unwrap())).unwrap();
    }

    // The disk key, as cryptsetup would get it (stdout is a pipe here).
    let out = inst.cli(&["keys", "unseal-disk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = out.stdout;
    assert_eq!(disk.len(), 32);

    // Every key of the hierarchy, unsealed by the library from the same blobs (the engine and
    // the CLI have let go of the swtpm, which serves one client at a time).
    let tunnel_pubkey = keys_ok(&inst, &["tunnel-pubkey"]);
    let settings = hl7edge::config::Settings::load(&inst.config).unwrap();
    let mut sealer = hl7edge::keys::open_sealer(&settings.keys).unwrap();
    let mut keys: Vec<(&str, Vec<u8>)> = Vec::new();
    for kind in hl7edge::keys::KeyKind::ALL {
        let (id, key) =
            hl7edge::keys::load_current(sealer.as_mut(), &settings.state_dir, kind).unwrap();
        assert_eq!(id, 1, "{}", kind.name());
        if kind == hl7edge::keys::KeyKind::Tunnel {
            assert_eq!(hl7edge::keys::tunnel_public_key(&key), tunnel_pubkey.trim());
        }
        keys.push((kind.name(), hl7edge::keys::disk_key_bytes(&key).to_vec()));
    }
    drop(sealer);
    let kinds: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
    assert_eq!(kinds, ["message", "audit", "disk", "tunnel"]);
    // The scan looks for the real keys: the library's disk key is the one cryptsetup gets, its
    // tunnel key the one behind `keys tunnel-pubkey`, and the four are distinct and non-trivial.
    assert_eq!(keys[2].1, disk);
    for (i, (name, k)) in keys.iter().enumerate() {
        assert!(k.iter().any(|b| *b != 0), "{name} key is all zeros");
        for (other, k2) in &keys[i + 1..] {
            assert_ne!(k, k2, "{name} and {other} keys are equal");
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, k) in &keys {
        forms.extend([
            (format!("{name} key raw"), k.clone()),
            (format!("{name} key hex"), hex::encode(k).into_bytes()),
            (format!("{name} key HEX"), hex::encode_upper(k).into_bytes()),
            (format!("{name} key base64"), b64.encode(k).into_bytes()),
            (
                format!("{name} key base64 (no padding)"),
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(k)
                    .into_bytes(),
            ),
            (
                format!("{name} key base64url"),
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(k)
                    .into_bytes(),
            ),
        ]);
    }

    let mut files = Vec::new();
    files_under(inst.dir.path(), &mut files);
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    for want in [
        "hl7edge.redb",
        ".wal",
        "engine.log",
        "keys/message-1.sealed",
        "keys/audit-1.sealed",
        "keys/disk-1.sealed",
        "keys/tunnel-1.sealed",
        "hl7edge.toml",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "{want} in {names:?}"
        );
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for c in &canaries {
            assert!(!contains(&bytes, c.as_bytes()), "{c} in {}", f.display());
        }
        for (what, form) in &forms {
            assert!(!contains(&bytes, form), "{what} in {}", f.display());
        }
    }
}

#[test]
fn rotation_keeps_old_records_deliverable_and_rewrap_leaves_none_under_the_old_key() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let port = free_port();
    let log = tmp.path().join("upstream.log");
    let extra = mllp_destination("hospital", port, "") + &route("all", &[], &[], &["hospital"]);
    let mut inst = tpm_instance(&tpm, &extra);
    keys_ok(&inst, &["init"]);

    // The upstream is down: messages wait in the queue, sealed under message key 1.
    inst.start();
    let mut sent = Vec::new();
    let mut conn = MllpConn::connect(inst.plain_addr());
    for i in 0..4 {
        let id = format!("OLD{i}");
        assert_eq!(
            ack_code(&conn.send(&adt(&id, "DOE"))).as_deref(),
            Some("AA")
        );
        sent.push(id);
    }
    drop(conn);
    assert_eq!(inst.stop(), Some(0));

    let out = keys_ok(&inst, &["rotate", "message"]);
    assert!(out.starts_with("message-2\t"), "{out}");
    let st = keys_ok(&inst, &["status"]);
    assert!(status_line(&st, "message-1").contains("records=4"), "{st}");
    let l2 = status_line(&st, "message-2");
    assert!(l2.contains("current") && l2.contains("records=0"), "{st}");

    inst.start();
    let mut conn = MllpConn::connect(inst.plain_addr());
    for i in 0..4 {
        let id = format!("NEW{i}");
        assert_eq!(
            ack_code(&conn.send(&adt(&id, "ROE"))).as_deref(),
            Some("AA")
        );
        sent.push(id);
    }
    drop(conn);
    assert_eq!(inst.stop(), Some(0));

    let st = keys_ok(&inst, &["status"]);
    assert!(status_line(&st, "message-1").contains("records=4"), "{st}");
    assert!(status_line(&st, "message-2").contains("records=4"), "{st}");
    let out = keys_ok(&inst, &["rewrap"]);
    assert!(
        out.starts_with("4 record(s) re-encrypted under message key 2"),
        "{out}"
    );
    let st = keys_ok(&inst, &["status"]);
    assert!(status_line(&st, "message-1").contains("records=0"), "{st}");
    assert!(status_line(&st, "message-2").contains("records=8"), "{st}");
    assert!(keys_ok(&inst, &["rewrap"]).starts_with("0 record(s)"));

    // Now the upstream comes up: every record, rewrapped or sealed after the rotation,
    // decrypts (GCM-authenticated with its id as associated data) and arrives in order.
    inst.start();
    let up = Upstream::python_hl7(&log, port, &[]);
    wait_for(&inst, "8 messages at the upstream", 30, || {
        (ids_with(&up.received(), "AA").len() >= 8).then_some(())
    });
    assert_eq!(first_occurrences(&up.received()), sent);
    assert_eq!(inst.stop(), Some(0));
    assert_eq!(inst.stored_control_ids(), sent);
}

#[test]
fn reseal_moves_every_key_to_a_new_pcr_set() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let inst = tpm_instance(&tpm, "");
    keys_ok(&inst, &["init"]);
    let pubkey = keys_ok(&inst, &["tunnel-pubkey"]);
    let text = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(&inst.config, text.replace("pcrs = [7]", "pcrs = [0, 7]")).unwrap();
    let out = keys_ok(&inst, &["reseal"]);
    assert_eq!(out.lines().count(), 4, "{out}");
    let st = keys_ok(&inst, &["status"]);
    assert!(st.contains("policy PCR sha256:0,7"), "{st}");
    for k in ["message-1", "audit-1", "disk-1", "tunnel-1"] {
        assert!(status_line(&st, k).contains("pcrs=sha256:0,7"), "{st}");
    }
    // Same keys, new policy: PCR 0 now matters too.
    assert_eq!(keys_ok(&inst, &["tunnel-pubkey"]), pubkey);
    tpm.extend_pcr(0);
    let (code, err) = run_refused(&inst);
    assert_eq!(code, 71, "{err}");
    assert!(
        err.contains("message key") && err.contains("PCR 0 (sha256)"),
        "{err}"
    );
}

#[test]
fn a_persistent_srk_is_used_when_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let ctx = tmp.path().join("srk.ctx");
    for args in [
        vec!["tpm2_createprimary", "-C", "o", "-G", "ecc", "-c"],
        vec!["tpm2_evictcontrol", "-C", "o", "-c"],
    ] {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]).arg(&ctx).args(["-T", &tpm.tcti()]);
        if args[0] == "tpm2_evictcontrol" {
            cmd.arg("0x81000001");
        }
        let out = cmd.env("TSS2_LOG", "all+NONE").output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // swtpm has no resource manager: drop tpm2-tools' transient copies.
    let out = Command::new("tpm2_flushcontext")
        .args(["-t", "-T", &tpm.tcti()])
        .env("TSS2_LOG", "all+NONE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut inst = tpm_instance(&tpm, "");
    let text = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(
        &inst.config,
        text.replace("pcrs = [7]\n", "pcrs = [7]\nsrk_handle = 0x81000001\n"),
    )
    .unwrap();
    keys_ok(&inst, &["init"]);
    let st = keys_ok(&inst, &["status"]);
    assert!(st.contains("storage key 0x81000001"), "{st}");
    assert!(status_line(&st, "message-1").contains("\tunseals"), "{st}");
    inst.start();
    assert_eq!(inst.stop(), Some(0));
    // Blobs sealed under the SRK do not load under the derived primary.
    std::fs::write(&inst.config, text).unwrap();
    let (code, err) = run_refused(&inst);
    assert_eq!(code, 71, "{err}");
    assert!(
        err.contains("message key") && err.contains("0x81000001"),
        "{err}"
    );
}

#[test]
fn the_development_sealer_warns_at_every_start() {
    let mut inst = Instance::new("", "");
    for _ in 0..2 {
        inst.start();
        assert_eq!(inst.stop(), Some(0));
    }
    assert_eq!(
        inst.log().matches("Development key sealer").count(),
        2,
        "{}",
        inst.log()
    );
}

#[test]
fn tpm_config_without_pcrs_is_refused_with_exit_64_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("hl7edge.toml");
    std::fs::write(
        &config,
        "[engine]\nstate_dir = \"/nonexistent\"\n[keys]\nprovider = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
    )
    .unwrap();
    for cmd in [&["check-config"][..], &["run"], &["keys", "status"]] {
        let out = Command::new(BIN)
            .args(cmd)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd:?}: {err}");
        assert!(
            err.contains(&config.display().to_string()) && err.contains("keys.pcrs"),
            "{cmd:?}: {err}"
        );
    }
}
