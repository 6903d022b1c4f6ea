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

/// A free TCP port on loopback, for a listener a test configures by number.
///
/// Taken from 20000..32000, below the kernel's ephemeral range (32768..60999 by default): a
/// port the kernel hands out for `bind(0)` goes back to that pool when released, and another
/// test's outgoing connection may take it as its source port before the engine binds it
/// (EADDRINUSE). Each test process starts at an offset of its own and never hands a port out
/// twice; the port is checked bindable on both TCP and UDP.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
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
    /// The notify socket the engine was started with, kept for the reload protocol.
    notify: Option<UnixDatagram>,
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
            notify: None,
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
        sock.set_read_timeout(Some(Duration::from_millis(500)))
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
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => break,
                Ok(_) => continue,
                // The read timeout only bounds the wait for an engine that exited or hangs.
                Err(e) if std::time::Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("engine exited before READY ({status}): {e}\n{}", self.log());
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("engine not ready: {e}\n{}", self.log());
                }
            }
        }
        // The socket stays bound (its file goes with the test's folder) for `reload`.
        self.notify = Some(sock);
        self.child = Some(child);
    }

    /// SIGHUP, then waits for the engine's RELOADING=1 and the READY=1 that ends the reload
    /// (systemd's reload protocol: the readiness signal, no sleeps).
    pub fn reload(&mut self) {
        let sock = self.notify.as_ref().expect("engine started");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 256];
        let mut reloading = false;
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    reloading |= msg.contains("RELOADING=1");
                    if reloading && msg.contains("READY=1") {
                        return;
                    }
                }
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "no reload: {e}\n{}",
                    self.log()
                ),
            }
        }
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

// ---- Store-and-forward helpers: upstream peers, destinations, queue status, bounded polls ----

/// One line of an upstream peer's `--log`: MSH-10, MSH-9 and the answer it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub control_id: String,
    pub message_type: String,
    pub code: String,
}

/// Reads an upstream `--log` file (missing file: nothing received yet).
pub fn read_upstream_log(path: &Path) -> Vec<Received> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Received {
                control_id: f.next()?.to_string(),
                message_type: f.next()?.to_string(),
                code: f.next()?.to_string(),
            })
        })
        .collect()
}

/// A third-party upstream receiver process (python-hl7 `upstream.py` or hl7apy
/// `hl7apy_upstream.py`), started and waited for (`READY <port>`); killed and reaped on drop.
pub struct Upstream {
    child: Option<Child>,
    _stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
    pub port: u16,
    pub log: PathBuf,
    stderr: PathBuf,
}

impl Upstream {
    /// Starts `script` from tests/peers with `--log log`, `--port port` (0: any) and `args`.
    pub fn spawn(script: &str, log: &Path, port: u16, args: &[String]) -> Upstream {
        use std::io::BufRead;
        let stderr = log.with_extension(format!("stderr-{}", rand_suffix()));
        let err_file = std::fs::File::create(&stderr).unwrap();
        let mut child = Command::new(venv().join("bin/python"))
            .arg(peer_script(script))
            .arg("--log")
            .arg(log)
            .args(["--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap_or(0);
        let port = match line.trim().strip_prefix("READY ") {
            Some(p) if n > 0 => p.parse().unwrap(),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{script} did not start: {line:?}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        Upstream {
            child: Some(child),
            _stdout: Some(out),
            port,
            log: log.to_path_buf(),
            stderr,
        }
    }

    /// The python-hl7 upstream (`upstream.py`): plain unless `args` has `--tls-cert`/`--tls-key`.
    pub fn python_hl7(log: &Path, port: u16, args: &[&str]) -> Upstream {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Self::spawn("upstream.py", log, port, &args)
    }

    /// The python-hl7 upstream over TLS with the instance's server certificate (for
    /// `localhost`/127.0.0.1); `mutual` also requires a client certificate from the test CA.
    pub fn python_hl7_tls(
        log: &Path,
        port: u16,
        pki: &DevPki,
        mutual: bool,
        args: &[&str],
    ) -> Upstream {
        let mut all: Vec<String> = vec![
            "--tls-cert".into(),
            pki.server_cert.display().to_string(),
            "--tls-key".into(),
            pki.server_key.display().to_string(),
        ];
        if mutual {
            all.push("--tls-ca".into());
            all.push(pki.ca_cert.display().to_string());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        Self::spawn("upstream.py", log, port, &all)
    }

    /// hl7apy's MLLPServer (plain; closes the connection after each reply).
    pub fn hl7apy(log: &Path, port: u16) -> Upstream {
        Self::spawn("hl7apy_upstream.py", log, port, &[])
    }

    /// What this upstream has received so far (every start that used the same log file).
    pub fn received(&self) -> Vec<Received> {
        read_upstream_log(&self.log)
    }

    /// The peer's stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and reaps it; the port is free again afterwards.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self._stdout = None;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Control IDs answered `code` (e.g. "AA"), in arrival order.
pub fn ids_with(log: &[Received], code: &str) -> Vec<String> {
    log.iter()
        .filter(|r| r.code == code)
        .map(|r| r.control_id.clone())
        .collect()
}

/// Control IDs in order of first arrival (later duplicates dropped).
pub fn first_occurrences(log: &[Received]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    log.iter()
        .filter(|r| seen.insert(r.control_id.clone()))
        .map(|r| r.control_id.clone())
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `secs` seconds; panics naming
/// `what` (and the engine log) when it never does.
pub fn wait_for<T>(inst: &Instance, what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {secs} s waiting for {what}\n{}",
                inst.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// python-hl7's `mllp_send --loose` of `file` to 127.0.0.1:`port`.
pub fn mllp_send(port: u16, file: &Path) -> Output {
    Command::new(venv().join("bin/mllp_send"))
        .args(["--loose", "-p", &port.to_string(), "-f"])
        .arg(file)
        .arg("127.0.0.1")
        .output()
        .unwrap()
}

/// A `[[destination]]` table for a plaintext upstream on loopback, with fast retries.
pub fn mllp_destination(name: &str, port: u16, extra: &str) -> String {
    format!(
        "\n[[destination]]\nname = \"{name}\"\nkind = \"mllp\"\naddress = \"127.0.0.1:{port}\"\n\
         danger_plaintext = true\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{extra}\n"
    )
}

/// A `[[destination]]` table for a TLS upstream trusting `ca`, with fast retries.
pub fn mllps_destination(name: &str, port: u16, ca: &Path, extra: &str) -> String {
    format!(
        "\n[[destination]]\nname = \"{name}\"\nkind = \"mllps\"\naddress = \"127.0.0.1:{port}\"\n\
         server_name = \"localhost\"\nca = \"{ca}\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{extra}\n",
        ca = ca.display()
    )
}

/// A `[[route]]` table; `types` and `apps` empty match everything.
pub fn route(name: &str, types: &[&str], apps: &[&str], dests: &[&str]) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[route]]\nname = \"{name}\"\nmessage_types = [{}]\nsending_applications = [{}]\n\
         destinations = [{}]\n",
        list(types),
        list(apps),
        list(dests)
    )
}

/// An instance with the default listeners plus `extra` (destinations, routes, `[store]`).
pub fn forwarding_instance(extra: &str) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("tls"), "test-gw").unwrap();
    let (a, b) = (free_port(), free_port());
    let text = config_text(dir.path(), &pki, a, b, "", "") + extra;
    Instance::with_config(dir, pki, a, b, &text)
}

/// A message of type `ty` (full MSH-9, e.g. `ORU^R01^ORU_R01`) from application `app`.
pub fn hl7_message(app: &str, ty: &str, control_id: &str) -> String {
    let body = match ty.split('^').next().unwrap_or("") {
        "ORU" => format!(
            "PID|1||MRN{control_id}^^^NORTHCLINIC^MR||DOE^JOHN||19700101|M\r\
             OBR|1||LAB{control_id}|GLU^Glucose^L|||20261203100000\r\
             OBX|1|NM|GLU^Glucose^L||95|mg/dL|70-99|N|||F\r"
        ),
        "ORM" => format!(
            "PID|1||MRN{control_id}^^^NORTHCLINIC^MR||DOE^JOHN||19700101|M\r\
             ORC|NW|ORD{control_id}\r\
             OBR|1|ORD{control_id}||XR^Chest X-ray^L\r"
        ),
        _ => format!(
            "EVN|{}|20261203101500\r\
             PID|1||MRN{control_id}^^^NORTHCLINIC^MR||DOE^JANE||19800101|F\r\
             PV1|1|I|WARD1^101^A\r",
            ty.split('^').nth(1).unwrap_or("A01")
        ),
    };
    format!(
        "MSH|^~\\&|{app}|NORTHCLINIC|HL7EDGE|HOSP|20261203101500||{ty}|{control_id}|P|2.5.1\r{body}"
    )
}

/// One plain MLLP connection sending messages one at a time.
pub struct MllpConn(TcpStream);

impl MllpConn {
    pub fn connect(addr: SocketAddr) -> MllpConn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        MllpConn(s)
    }

    /// Sends one message and returns the ACK's text.
    pub fn send(&mut self, msg: &str) -> String {
        self.0.write_all(&frame(msg.as_bytes())).unwrap();
        String::from_utf8_lossy(&read_frame(&mut self.0).expect("an ACK")).into_owned()
    }
}

impl Instance {
    /// `hl7edge queue <args> --json`, parsed; panics when the command fails.
    pub fn queue_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "hl7edge {all:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The `queue status --json` entry of destination `name`.
    pub fn dest_status(&self, name: &str) -> serde_json::Value {
        let st = self.queue_json(&["status"]);
        st["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no destination {name} in {st}"))
    }

    /// Dead letters (`queue dead --json`) of destination `name`.
    pub fn dead_letters(&self, name: &str) -> Vec<serde_json::Value> {
        self.queue_json(&["dead", "--destination", name])["letters"]
            .as_array()
            .unwrap()
            .clone()
    }
}
