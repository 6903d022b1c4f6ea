//! Telemetry: tracing to journald when its socket exists, stderr otherwise; and the engine's
//! counters. Each event that matters is one function here that both logs and counts, so the two
//! never drift apart. No event carries message content: peers, listener names, control IDs,
//! sizes and codes only.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides `default_level`.
///
/// With journald, fields keep their names (upper-cased: `MESSAGE_ID`, `AUDIT_SEQ`,
/// `CONTROL_ID`, ...) so audit records carry journald's own `MESSAGE_ID`; alerts (target
/// `hl7edge::alert`) go through a second layer that maps ERROR to priority alert (1) and WARN
/// to crit (2).
pub fn init(force_stderr: bool, default_level: &str) {
    use tracing_journald::{Priority, PriorityMappings};
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::Layer as _;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let registry = tracing_subscriber::registry().with(filter);
    if !force_stderr && std::path::Path::new("/run/systemd/journal/socket").exists() {
        if let (Ok(journald), Ok(alerts)) = (tracing_journald::layer(), tracing_journald::layer()) {
            let is_alert = |m: &tracing::Metadata<'_>| m.target() == "hl7edge::alert";
            let journald = journald
                .with_syslog_identifier("hl7edge".into())
                .with_field_prefix(None)
                .with_filter(filter_fn(move |m| !is_alert(m)));
            let alerts = alerts
                .with_syslog_identifier("hl7edge".into())
                .with_field_prefix(None)
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Alert,
                    warn: Priority::Critical,
                    ..PriorityMappings::new()
                })
                .with_filter(filter_fn(is_alert));
            let _ = registry.with(journald).with(alerts).try_init();
            return;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Engine-wide counters.
        #[derive(Debug, Default)]
        pub struct Counters { $(pub $name: AtomicU64,)* }

        impl Counters {
            /// Name and value of every counter, for metrics and the bench report.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    connections_accepted,
    connections_refused_source,
    connections_over_limit,
    connections_idle_closed,
    tls_handshake_failures,
    tls_client_not_allowed,
    messages_accepted,
    messages_duplicate,
    messages_rejected,
    messages_unrouted,
    messages_store_failed,
    frames_oversized,
    frames_truncated,
    bytes_discarded,
    acks_sent,
    naks_sent,
);

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
