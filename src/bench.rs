//! `hl7edge bench`: durable intake measured end to end against an in-process engine on
//! loopback, with the disk's own fsync rate measured in the same run for comparison.
//! Figures only; nothing here asserts a target.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::client::MllpClient;
use crate::demo::samples::adt_1k;
use crate::demo::upstream;
use crate::devpki;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Messages per scenario.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Concurrent connections for the parallel scenarios.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub connections: usize,
    /// Offered rate (msg/s) of the latency scenario.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Folder for the store and certificates (default: a new folder under /var/tmp, on disk).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Messages queued while the upstream is down, for the restart and drain figures.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Run only the forwarding scenarios (relay, backlog, restart, drain).
    #[arg(long)]
    pub relay_only: bool,
    /// Run only the intake scenarios.
    #[arg(long, conflicts_with = "relay_only")]
    pub intake_only: bool,
}

/// A count of 1 or more (0 connections would divide by zero).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

struct Report {
    label: String,
    messages: usize,
    elapsed: Duration,
    lat_us: Vec<u64>,
    failures: usize,
    /// CPU time (user + system) per message of this process (load generator, upstream
    /// receiver) and the engine's process together.
    cpu_us: f64,
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec().max(0) as u64, tv.tv_usec().max(0) as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

impl Report {
    fn print(&mut self) {
        self.lat_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.lat_us.is_empty() {
                return 0.0;
            }
            let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
            self.lat_us[i.min(self.lat_us.len() - 1)] as f64 / 1000.0
        };
        println!(
            "{:<44} {:>9.0} msg/s   p50 {:>6.2} ms   p99 {:>6.2} ms   cpu {:>4.0} µs/msg   ({} msgs, {} not AA)",
            self.label,
            self.messages as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            self.cpu_us,
            self.messages,
            self.failures
        );
    }
}

/// fdatasync rate of 4 KiB writes in `dir` for about `secs` seconds: appended to a growing
/// file, or (`preallocated`) written over a zero-filled one, as the write-ahead log writes.
fn fsync_rate(dir: &std::path::Path, secs: f64, preallocated: bool) -> anyhow::Result<f64> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    if preallocated {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
        f.rewind()?;
    }
    let block = [0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs && n < 16 * 1024 {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// Mean round trip of `payload` sent over loopback TCP between two threads of this process
/// that block in `read`, answered with an ACK-sized reply: no TLS, no parsing, no disk. What the
/// machine itself costs a sequential sender (on a VM, mostly waking an idle virtual CPU twice),
/// so that the sequential figures can be read against it.
fn loopback_round_trip(payload: &[u8], rounds: usize) -> anyhow::Result<Duration> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let len = payload.len();
    let echo = std::thread::Builder::new()
        .name("bench-loopback".into())
        .spawn(move || -> std::io::Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; len];
            let reply = [b'A'; 150];
            loop {
                match s.read_exact(&mut buf) {
                    Ok(()) => s.write_all(&reply)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })?;
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut reply = [0u8; 150];
    let start = Instant::now();
    for _ in 0..rounds {
        c.write_all(payload)?;
        c.read_exact(&mut reply)?;
    }
    let elapsed = start.elapsed();
    drop(c);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the loopback echo thread panicked"))??;
    Ok(elapsed / rounds.max(1) as u32)
}

/// [`fsync_rate`] off the runtime's threads.
async fn probe(dir: &std::path::Path, secs: f64, preallocated: bool) -> anyhow::Result<f64> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || fsync_rate(&dir, secs, preallocated)).await?
}

enum Target {
    Plain(std::net::SocketAddr),
    Tls(std::net::SocketAddr, TlsConnector),
}

async fn connection(
    target: &Target,
    run: usize,
    conn: usize,
    conns: usize,
    count: usize,
    pace: Option<Duration>,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let tcp = tokio::net::TcpStream::connect(match target {
        Target::Plain(a) | Target::Tls(a, _) => *a,
    })
    .await?;
    tcp.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(count);
    let mut failures = 0;
    macro_rules! drive {
        ($client:expr) => {{
            let mut client = $client;
            // Stagger the connections over one period so the offered load is even, not bursts.
            let mut next =
                Instant::now() + pace.unwrap_or_default().mul_f64(conn as f64 / conns as f64);
            for i in 0..count {
                if let Some(p) = pace {
                    tokio::time::sleep_until(next.into()).await;
                    next += p;
                }
                let msg = adt_1k(&format!("B{run}C{conn}N{i}"));
                let t = Instant::now();
                let ack = client.exchange(&msg).await?;
                lat.push(t.elapsed().as_micros() as u64);
                if !ack.windows(6).any(|w| w == b"MSA|AA") {
                    failures += 1;
                }
            }
        }};
    }
    match target {
        Target::Plain(_) => drive!(MllpClient::new(tcp)),
        Target::Tls(_, c) => drive!(MllpClient::new(
            c.connect(ServerName::try_from("localhost")?, tcp).await?
        )),
    }
    Ok((lat, failures))
}

async fn scenario(
    label: &str,
    target: Arc<Target>,
    run: usize,
    messages: usize,
    conns: usize,
    rate: Option<u32>,
    engine: &EngineProcess,
) -> anyhow::Result<Report> {
    let per = messages / conns;
    let pace = rate.map(|r| Duration::from_secs_f64(conns as f64 / r as f64));
    let start = Instant::now();
    let cpu = cpu_time() + engine.cpu();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let target = Arc::clone(&target);
        tasks.push(tokio::spawn(async move {
            connection(&target, run, c, conns, per, pace).await
        }));
    }
    let mut lat_us = Vec::with_capacity(messages);
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await??;
        lat_us.extend(l);
        failures += f;
    }
    let cpu = (cpu_time() + engine.cpu()).saturating_sub(cpu);
    Ok(Report {
        label: label.to_string(),
        messages: per * conns,
        elapsed: start.elapsed(),
        lat_us,
        failures,
        cpu_us: cpu.as_secs_f64() * 1e6 / (per * conns).max(1) as f64,
    })
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = args.state_dir.clone().unwrap_or_else(|| {
        PathBuf::from("/var/tmp").join(format!("hl7edge-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    println!(
        "hl7edge bench: {} messages of {} bytes per scenario, store under {}",
        args.messages,
        adt_1k("B0C0N0").len(),
        dir.display()
    );
    println!(
        "cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // Ctrl-C or SIGTERM drops the scenarios (their engine process is killed with them) and
    // removes the store as a finished run does; a failed run leaves it, with the engine's log,
    // for inspection.
    // The engine runs in a process group of its own, so a terminal's Ctrl-C reaches the bench
    // only, and the bench stops it.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let outcome = tokio::select! {
        biased;
        Some(()) = int.recv() => Ok(Some(nix::sys::signal::Signal::SIGINT)),
        Some(()) = term.recv() => Ok(Some(nix::sys::signal::Signal::SIGTERM)),
        r = scenarios(&args, &dir) => r.map(|()| None),
    };
    let interrupted = match outcome {
        Ok(signal) => signal,
        Err(e) => {
            return Err(e.context(format!(
                "bench failed; its store is left under {}",
                dir.display()
            )))
        }
    };
    if let Some(signal) = interrupted {
        eprintln!("hl7edge bench: interrupted by {signal}");
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM")) {
            println!(
                "peak RSS of the bench process (load generator, upstream receiver): {}",
                line.trim_start_matches("VmHWM:").trim()
            );
        }
    }
    if args.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match interrupted {
        // As a shell reports a process a signal ended: 128 + its number.
        Some(signal) => std::process::exit(128 + signal as i32),
        None => Ok(()),
    }
}

async fn scenarios(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    if !args.relay_only {
        intake(args, &dir.join("intake")).await?;
    }
    if !args.intake_only {
        relay(args, &dir.join("relay")).await?;
    }
    Ok(())
}

/// Waits until `count` reaches `n`; returns when it did, or `None` after `limit`.
async fn until_count(count: &AtomicU64, n: u64, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if count.load(Ordering::Acquire) >= n {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The engine as its own process (`hl7edge run`), so that its memory and CPU are measured
/// apart from the load generator and the upstream receiver.
struct EngineProcess {
    child: std::process::Child,
}

impl EngineProcess {
    /// Starts `hl7edge run --config <config>` and returns once it sends READY=1 to the
    /// NOTIFY_SOCKET it was given (as systemd would see it), with the time that took.
    async fn start(
        config: &std::path::Path,
        dir: &std::path::Path,
    ) -> anyhow::Result<(Self, Duration)> {
        let sock_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&sock_path);
        let sock = tokio::net::UnixDatagram::bind(&sock_path)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("engine.log"))?;
        let t = Instant::now();
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &sock_path)
            // As systemd/hl7edge.service sets it, unless the caller chose otherwise.
            .env(
                "MALLOC_ARENA_MAX",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
            )
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the engine process")?;
        let engine = EngineProcess { child };
        let mut buf = [0u8; 512];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(120), sock.recv(&mut buf))
                .await
                .with_context(|| {
                    format!(
                        "engine not ready within 120 s; see {}",
                        dir.join("engine.log").display()
                    )
                })??;
            if buf[..n].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
                return Ok((engine, t.elapsed()));
            }
        }
    }

    /// A `/proc/<pid>/status` line's value, such as `VmRSS` or `VmHWM`.
    fn status(&self, key: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                    .map(|l| l[key.len() + 1..].trim().to_string())
            })
            .unwrap_or_else(|| "?".into())
    }

    /// User + system CPU time of the engine process so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name: state is the 3rd field, utime the 14th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&h| h > 0)
            .unwrap_or(100) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        // Polled, not waited for on a blocking thread: an interrupted bench drops this future
        // and, still owning the child, kills it (Drop).
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        anyhow::ensure!(status.success(), "engine exited with {status}");
        Ok(())
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        // Only after an error: a stopped engine has been waited for already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The upstream receiver on a thread and runtime of its own: the hospital is another machine,
/// and on the load generator's thread each of its answers would wait behind 32 clients' work.
/// Stops when dropped.
struct Upstream {
    addr: std::net::SocketAddr,
    count: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(bind: std::net::SocketAddr) -> anyhow::Result<Upstream> {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match upstream::start(bind, None, false).await {
                        Ok(h) => {
                            let _ = started_tx.send(Ok((h.addr, Arc::clone(&h.count))));
                            let _ = stopped.await;
                            drop(h);
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let (addr, count) = started
            .recv()
            .context("the upstream receiver's thread ended")??;
        Ok(Upstream {
            addr,
            count,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port free on loopback now (the engine process binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Forwarding figures, against the engine as its own process: end-to-end relay to a fast
/// upstream, then a backlog queued while the upstream is down, the engine's restart with that
/// backlog, and the backlog's drain; with the engine's own memory at each step.
async fn relay(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pki = devpki::generate(&dir.join("tls"), "demo-ehr")?;
    let hospital = Upstream::start(([127, 0, 0, 1], 0).into())?;
    let up_addr = hospital.addr;
    let port = free_port()?;
    let config = crate::demo::write_config(
        dir,
        &pki,
        port,
        free_port()?,
        crate::demo::Forward::Plain(up_addr),
    )?;
    let (engine, _) = EngineProcess::start(&config, dir).await?;
    let tls = Arc::new(Target::Tls(
        ([127, 0, 0, 1], port).into(),
        TlsConnector::from(devpki::client_config(&pki)?),
    ));

    // 1. End to end: intake over MLLPS, queue, forward over MLLP, upstream ACK.
    let start = Instant::now();
    let label = format!(
        "relay: {} conns MLLPS in -> MLLP upstream",
        args.connections
    );
    let mut r = scenario(
        &label,
        Arc::clone(&tls),
        10,
        args.messages,
        args.connections,
        None,
        &engine,
    )
    .await?;
    let n = r.messages as u64;
    let done = until_count(&hospital.count, n, Duration::from_secs(600)).await;
    r.label = format!("{label} (intake)");
    r.print();
    match done {
        Some(t) => println!(
            "{:<44} {:>9.0} msg/s   (intake to upstream ACK, {} msgs)",
            "relay: end to end",
            n as f64 / (t - start).as_secs_f64(),
            n
        ),
        None => println!("relay: end to end: not all delivered within 600 s"),
    }

    // 2. A backlog: the upstream is down while messages are acknowledged and queued.
    drop(hospital);
    let backlog = args.backlog.max(args.connections);
    let label = format!("backlog: {backlog} queued, upstream down");
    let mut r = scenario(
        &label,
        Arc::clone(&tls),
        11,
        backlog,
        args.connections,
        None,
        &engine,
    )
    .await?;
    r.print();
    let queued = (r.messages - r.failures) as u64;
    println!(
        "{:<44} {}   (peak {})",
        "engine RSS with the backlog queued",
        engine.status("VmRSS"),
        engine.status("VmHWM")
    );
    engine.stop().await?;

    // 3. Restart with the backlog: from process start to READY=1 (listeners bound, store open,
    //    forwarders running).
    let (engine, ready) = EngineProcess::start(&config, dir).await?;
    println!(
        "{:<44} {:>9.1} ms   ({queued} messages queued; process start to READY=1)",
        "restart with the backlog until ready",
        ready.as_secs_f64() * 1000.0
    );
    println!(
        "{:<44} {}",
        "engine RSS after the restart",
        engine.status("VmRSS")
    );

    // 4. Drain: the upstream comes back at the same address.
    let hospital = Upstream::start(up_addr)?;
    let first = until_count(&hospital.count, 1, Duration::from_secs(30)).await;
    let last = until_count(&hospital.count, queued, Duration::from_secs(900)).await;
    match (first, last) {
        (Some(a), Some(b)) => println!(
            "{:<44} {:>9.0} msg/s   ({queued} msgs, first to last upstream ACK)",
            "drain of the backlog",
            queued.saturating_sub(1) as f64 / (b - a).as_secs_f64().max(1e-9)
        ),
        _ => println!(
            "drain of the backlog: {} of {queued} delivered in time",
            hospital.count.load(Ordering::Acquire)
        ),
    }
    println!(
        "{:<44} {}   (peak {})",
        "engine RSS after the drain",
        engine.status("VmRSS"),
        engine.status("VmHWM")
    );
    engine.stop().await?;
    Ok(())
}

/// Durable intake figures (no forwarding).
async fn intake(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pki = devpki::generate(&dir.join("tls"), "demo-ehr")?;
    let (tls_port, plain_port) = (free_port()?, free_port()?);
    let config =
        crate::demo::write_config(dir, &pki, tls_port, plain_port, crate::demo::Forward::None)?;
    let (engine, _) = EngineProcess::start(&config, dir).await?;
    let tls = Arc::new(Target::Tls(
        ([127, 0, 0, 1], tls_port).into(),
        TlsConnector::from(devpki::client_config(&pki)?),
    ));
    let plain = Arc::new(Target::Plain(([127, 0, 0, 1], plain_port).into()));

    let appended = probe(dir, 2.0, false).await?;
    println!(
        "{:<44} {:>9.0} fsync/s  (4 KiB appended + fdatasync, same disk)",
        "disk, growing file", appended
    );
    // The disk varies from second to second here: each sequential run is compared with a probe
    // of the same write pattern as the log's (overwrite of zero-filled blocks) taken just before.
    let seq_n = (args.messages / 4).max(100);
    let mut shares = Vec::new();
    for (label, target, run) in [
        ("1 connection, plain MLLP, sequential", &plain, 1),
        ("1 connection, MLLPS, sequential", &tls, 2),
    ] {
        let fsync = probe(dir, 2.0, true).await?;
        println!(
            "{:<44} {:>9.0} fsync/s  (4 KiB over zero-filled blocks + fdatasync, as the log)",
            "disk, preallocated file", fsync
        );
        let framed = crate::hl7::mllp::encode(&adt_1k("B0C0N0"));
        let rtt = tokio::task::spawn_blocking(move || loopback_round_trip(&framed, 5000)).await??;
        println!(
            "{:<44} {:>9.1} µs       (two blocking threads, 1 KB out, 150 B back, no TLS, no disk)",
            "loopback round trip",
            rtt.as_secs_f64() * 1e6
        );
        let mut r = scenario(label, Arc::clone(target), run, seq_n, 1, None, &engine).await?;
        r.print();
        shares.push(100.0 * r.messages as f64 / r.elapsed.as_secs_f64() / fsync);
    }
    println!(
        "{:<44} {:>8.0} %    (plain) {:.0} % (TLS)",
        "sequential vs disk fsync rate (preallocated)", shares[0], shares[1]
    );
    let label = format!("{} connections, plain MLLP", args.connections);
    scenario(
        &label,
        Arc::clone(&plain),
        3,
        args.messages,
        args.connections,
        None,
        &engine,
    )
    .await?
    .print();
    let label = format!("{} connections, MLLPS mTLS", args.connections);
    scenario(
        &label,
        Arc::clone(&tls),
        4,
        args.messages,
        args.connections,
        None,
        &engine,
    )
    .await?
    .print();
    let n = ((args.rate as usize) * 10).min(args.messages.max(1000));
    let label = format!(
        "{} msg/s offered, MLLPS, {} connections",
        args.rate, args.connections
    );
    scenario(
        &label,
        Arc::clone(&tls),
        5,
        n,
        args.connections,
        Some(args.rate),
        &engine,
    )
    .await?
    .print();

    println!(
        "{:<44} {}   (peak {})",
        "engine RSS after the intake scenarios",
        engine.status("VmRSS"),
        engine.status("VmHWM")
    );
    engine.stop().await
}
