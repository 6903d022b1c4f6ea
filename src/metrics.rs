//! Prometheus text metrics on an optional listener (loopback unless a `danger_` knob says
//! otherwise): the queue figures of `queue status` and the intake counters. Any request on the
//! socket gets the metrics page; a scraper needs nothing more, so no HTTP framework is pulled in.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::{status_report, Context};
use crate::telemetry::Counters;

/// Renders every metric.
pub fn render(ctx: &Context, counters: &Counters) -> String {
    let mut out = String::new();
    for (name, value) in counters.snapshot() {
        let _ = writeln!(out, "# TYPE hl7edge_{name}_total counter");
        let _ = writeln!(out, "hl7edge_{name}_total {value}");
    }
    let _ = writeln!(out, "# TYPE hl7edge_alerts_total counter");
    let fired = ctx
        .alerts_fired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (rule, n) in fired {
        let _ = writeln!(out, "hl7edge_alerts_total{{rule=\"{rule}\"}} {n}");
    }
    let Ok(rep) = status_report(
        &ctx.reader,
        &ctx.dests,
        Some((&ctx.statuses, &ctx.live)),
        ctx.quota,
    ) else {
        return out;
    };
    let _ = writeln!(out, "# TYPE hl7edge_store_bytes gauge");
    let _ = writeln!(out, "hl7edge_store_bytes {}", rep.stored_bytes);
    let _ = writeln!(out, "# TYPE hl7edge_store_quota_bytes gauge");
    let _ = writeln!(out, "hl7edge_store_quota_bytes {}", rep.quota_bytes);
    let families: [(&str, &str); 7] = [
        ("queue_depth", "gauge"),
        ("queue_oldest_age_seconds", "gauge"),
        ("dead_letters", "gauge"),
        ("delivered_total", "counter"),
        ("retried_total", "counter"),
        ("dead_lettered_total", "counter"),
        ("destination_up", "gauge"),
    ];
    for (family, kind) in families {
        let _ = writeln!(out, "# TYPE hl7edge_{family} {kind}");
        for d in &rep.destinations {
            let live = d.live.clone().unwrap_or_default();
            let value = match family {
                "queue_depth" => d.queue.depth as f64,
                "queue_oldest_age_seconds" => d.oldest_age_s.unwrap_or(0.0),
                "dead_letters" => d.queue.dead_letters as f64,
                "delivered_total" => live.delivered as f64,
                "retried_total" => live.retried as f64,
                "dead_lettered_total" => live.dead_lettered as f64,
                _ => f64::from(u8::from(live.state == "connected" || live.state == "idle")),
            };
            let _ = writeln!(
                out,
                "hl7edge_{family}{{destination=\"{}\"}} {value}",
                d.name
            );
        }
    }
    out
}

/// Serves the metrics page until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Context,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = shutdown.changed() => break,
        };
        let ctx = ctx.clone();
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            // Read the request head (bounded, with a timeout); its content does not matter.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let body = tokio::task::spawn_blocking(move || render(&ctx, &counters))
                .await
                .unwrap_or_default();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
