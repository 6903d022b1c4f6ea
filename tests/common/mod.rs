//! Shared harness for integration tests: start the real `hl7edge` binary on a generated
//! configuration, wait for its sd_notify READY (the readiness signal, no sleeps), and stop it
//! by PID when the test ends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub use hl7edge::devpki::{self, DevPki};

pub const BIN: &str = env!("CARGO_BIN_EXE_hl7edge");

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Python venv with python-hl7 and hl7apy that tests/run.sh made.
pub fn venv() -> PathBuf {
    let v = std::env::var("HL7EDGE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/.venv")));
    assert!(
        v.join("bin/python").exists(),
        "third-party HL7 peers missing: run tests/run.sh, which creates {}",
        v.display()
    );
    v
}

pub fn peer_script(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers")).join(name)
}

/// A test instance: its folder, certificates and configuration.
pub struct Instance {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub config: PathBuf,
    pub mllps_port: u16,
    pub mllp_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// Configuration with an `integration` mllps listener and a `legacy` mllp listener on
/// loopback; `extra_listener` is appended to the legacy listener's table (e.g. `idle_timeout`).
pub fn config_text(
    dir: &Path,
    pki: &DevPki,
    mllps_port: u16,
    mllp_port: u16,
    extra_tls: &str,
    extra_legacy: &str,
) -> String {
    format!(
        r#"[engine]
environment = "development"
state_dir = "{state}"
shutdown_grace = "5s"

[keys]
provider = "development"

[[listener]]
name = "integration"
kind = "mllps"
address = "127.0.0.1:{mllps_port}"
max_message_size = 65536

[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
{extra_tls}

[[listener]]
name = "legacy"
kind = "mllp"
address = "127.0.0.1:{mllp_port}"
allow = ["127.0.0.1/32"]
max_message_size = 65536
{extra_legacy}
"#,
        state = dir.join("state").display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_cert.display(),
    )
}

impl Instance {
    /// A new instance with the default listeners; `extra_*` go into the listener tables.
    pub fn new(extra_tls: &str, extra_legacy: &str) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let pki = devpki::generate(&dir.path().join("tls"), "test-ehr").unwrap();
        let (mllps_port, mllp_port) = (free_port(), free_port());
        let text = config_text(
            dir.path(),
            &pki,
            mllps_port,
            mllp_port,
            extra_tls,
            extra_legacy,
        );
        Self::with_config(dir, pki, mllps_port, mllp_port, &text)
    }

    pub fn with_config(
        dir: tempfile::TempDir,
        pki: DevPki,
        mllps_port: u16,
        mllp_port: u16,
        text: &str,
    ) -> Instance {
        let config = dir.path().join("hl7edge.toml");
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("engine.log");
        Instance {
            dir,
            pki,
            config,
            mllps_port,
            mllp_port,
            child: None,
            log,
        }
    }

    /// Starts the engine and waits for READY=1 on a notify socket.
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    /// Starts the engine, letting `adjust` change the command (e.g. run it in a netns).
    pub fn start_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        let sock_path = self
            .dir
            .path()
            .join(format!("notify-{}.sock", rand_suffix()));
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        adjust(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut buf = [0u8; 256];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => break,
                Ok(_) => continue,
                Err(e) => {
                    let _ = child.kill();
                    panic!("engine not ready: {e}\n{}", self.log());
                }
            }
        }
        let _ = std::fs::remove_file(&sock_path);
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().ok().and_then(|s| s.code())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn plain_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mllp_port))
    }

    /// `hl7edge` with a subcommand against this instance's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// Control IDs of every stored message (engine stopped).
    pub fn stored_control_ids(&self) -> Vec<String> {
        let out = self.cli(&["store", "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('\t').nth(5).map(str::to_string))
            .collect()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn rand_suffix() -> String {
    format!("{}-{:?}", std::process::id(), std::time::Instant::now())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "")
}

/// A sample message with the given control ID and PID-5 family name.
pub fn adt(control_id: &str, family: &str) -> String {
    format!(
        "MSH|^~\\&|LAB|NORTHCLINIC|HL7EDGE|HOSP|20261203101500||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         EVN|A01|20261203101500\r\
         PID|1||MRN{control_id}^^^NORTHCLINIC^MR||{family}^JANE||19800101|F\r\
         PV1|1|I|WARD1^101^A\r"
    )
}

/// MLLP frame.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0x0b];
    v.extend_from_slice(msg);
    v.extend_from_slice(&[0x1c, 0x0d]);
    v
}

/// Reads one MLLP frame's payload; `None` when the connection closed first.
pub fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    let mut started = false;
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match b[0] {
            0x0b => started = true,
            0x1c if started => {
                let _ = s.read(&mut b);
                return Some(out);
            }
            x if started => out.push(x),
            _ => {}
        }
    }
}

/// Sends one framed message over plain TCP and returns the ACK payload.
pub fn send_plain(addr: SocketAddr, msg: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&frame(msg.as_bytes())).ok()?;
    read_frame(&mut s).map(|a| String::from_utf8_lossy(&a).into_owned())
}

/// The MSA-1 code of an ACK.
pub fn ack_code(ack: &str) -> Option<String> {
    ack.split(['\r', '\n'])
        .find(|s| s.starts_with("MSA|"))
        .and_then(|s| s.split('|').nth(1))
        .map(str::to_string)
}
