//! `hl7edge bench`: durable intake measured end to end against an in-process engine on
//! loopback, with the disk's own fsync rate measured in the same run for comparison.
//! Figures only; nothing here asserts a target.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::client::MllpClient;
use crate::config::Settings;
use crate::demo::samples::adt_1k;
use crate::devpki;
use crate::engine::Engine;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Messages per scenario.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Concurrent connections for the parallel scenarios.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Offered rate (msg/s) of the latency scenario.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Folder for the store and certificates (default: a new folder under /var/tmp, on disk).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

struct Report {
    label: String,
    messages: usize,
    elapsed: Duration,
    lat_us: Vec<u64>,
    failures: usize,
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
            "{:<44} {:>9.0} msg/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} msgs, {} not AA)",
            self.label,
            self.messages as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            self.messages,
            self.failures
        );
    }
}

/// fdatasync rate of 4 KiB writes in `dir` for about `secs` seconds.
fn fsync_rate(dir: &std::path::Path, secs: f64) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
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
) -> anyhow::Result<Report> {
    let per = messages / conns;
    let pace = rate.map(|r| Duration::from_secs_f64(conns as f64 / r as f64));
    let start = Instant::now();
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
    Ok(Report {
        label: label.to_string(),
        messages: per * conns,
        elapsed: start.elapsed(),
        lat_us,
        failures,
    })
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = args.state_dir.clone().unwrap_or_else(|| {
        PathBuf::from("/var/tmp").join(format!("hl7edge-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let pki = devpki::generate(&dir.join("tls"), "demo-ehr")?;
    let config = crate::demo::write_config(&dir, &pki, 0, 0, crate::demo::Forward::None)?;
    let settings = Settings::load(&config)?;
    let engine = Engine::start(&settings).await?;
    let tls_addr = engine
        .addr("integration")
        .context("no integration listener")?;
    let plain_addr = engine.addr("legacy").context("no legacy listener")?;
    let tls = Arc::new(Target::Tls(
        tls_addr,
        TlsConnector::from(devpki::client_config(&pki)?),
    ));
    let plain = Arc::new(Target::Plain(plain_addr));

    println!(
        "hl7edge bench: {} messages of {} bytes per scenario, store in {}",
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
    let fsync = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || fsync_rate(&dir, 3.0)
    })
    .await??;
    println!(
        "{:<44} {:>9.0} fsync/s  (4 KiB write + fdatasync, same disk)",
        "disk", fsync
    );

    let seq_n = (args.messages / 4).max(100);
    let mut r = scenario(
        "1 connection, plain MLLP, sequential",
        Arc::clone(&plain),
        1,
        seq_n,
        1,
        None,
    )
    .await?;
    r.print();
    let seq_plain = r.messages as f64 / r.elapsed.as_secs_f64();
    let mut r = scenario(
        "1 connection, MLLPS, sequential",
        Arc::clone(&tls),
        2,
        seq_n,
        1,
        None,
    )
    .await?;
    r.print();
    let seq_tls = r.messages as f64 / r.elapsed.as_secs_f64();
    println!(
        "{:<44} {:>8.0} %    (plain) {:.0} % (TLS)",
        "sequential vs disk fsync rate",
        100.0 * seq_plain / fsync,
        100.0 * seq_tls / fsync
    );
    let label = format!("{} connections, plain MLLP", args.connections);
    scenario(
        &label,
        Arc::clone(&plain),
        3,
        args.messages,
        args.connections,
        None,
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
    )
    .await?
    .print();

    engine.shutdown().await;
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM")) {
            println!(
                "peak RSS (engine and load generator together): {}",
                line.trim_start_matches("VmHWM:").trim()
            );
        }
    }
    if args.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
