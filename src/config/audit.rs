//! `[audit]` and `[alerts]`: retention of the audit trail, checkpoints, what goes to journald,
//! and the alert rules.

use std::time::Duration;

use serde::Deserialize;

use super::file::Ctx;
use crate::audit::alerts::{AlertSettings, Rate, TimeWindow};

/// Six years, HIPAA's retention for documentation such as audit logs, counted with the two leap
/// days six years can hold: the default retention.
const SIX_YEARS: Duration = Duration::from_secs(6 * 365 * 86_400 + 2 * 86_400);

/// Six years as an operator writes them, `"6y"` (humantime counts a year as 365.25 days, half a
/// day under [`SIX_YEARS`]): the default legal minimum, so that `retention = "6y"` is accepted.
const SIX_YEARS_AS_WRITTEN: Duration = Duration::from_secs(6 * 365 * 86_400 + 3 * 43_200);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// How long audit records are kept. Default 6 years; never below `legal_minimum`.
    #[serde(default = "six_years", with = "humantime_serde")]
    pub retention: Duration,
    /// The retention the law requires here; `retention` below it is refused. Default 6 years.
    #[serde(default = "six_years_as_written", with = "humantime_serde")]
    pub legal_minimum: Duration,
    /// Sign a checkpoint after this many records...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or this long after the last one, whichever comes first.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Also send per-message records (received, delivered) to journald, not only to the chain.
    #[serde(default)]
    pub journal_messages: bool,
}

impl Default for AuditFile {
    fn default() -> Self {
        AuditFile {
            retention: SIX_YEARS,
            legal_minimum: SIX_YEARS_AS_WRITTEN,
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval: default_checkpoint_interval(),
            journal_messages: false,
        }
    }
}

fn six_years() -> Duration {
    SIX_YEARS
}
fn six_years_as_written() -> Duration {
    SIX_YEARS_AS_WRITTEN
}
fn default_checkpoint_every() -> u64 {
    10_000
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateFile {
    /// Events (or records and messages, for `bulk`) that raise the alert...
    pub threshold: u64,
    /// ...within this window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// Failed authentications (TLS handshakes, refused client identities, control socket
    /// users). Default 10 within 5 minutes. `false` turns it off.
    #[serde(default = "default_failed_auth")]
    pub failed_auth: Toggle<RateFile>,
    /// When administrative access is expected (UTC, e.g. `"Mon-Fri 07:00-19:00"`); each access
    /// outside it alerts. Absent: no such alert.
    pub admin_hours: Option<String>,
    /// Audit records exported plus dead letters replayed. Default 1000 within 10 minutes.
    #[serde(default = "default_bulk")]
    pub bulk: Toggle<RateFile>,
    /// When configuration changes are expected (UTC). Absent: no such alert.
    pub change_window: Option<String>,
    /// Messages waiting in one destination's queue. Default 100000.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: Option<u64>,
    /// Age of the oldest message waiting in a queue. Default 1h.
    #[serde(default = "default_queue_age", with = "humantime_serde")]
    pub queue_age: Option<Duration>,
    /// A certificate (listener, client, CA) expiring within this. Default 30 days.
    #[serde(default = "default_cert_expiry", with = "humantime_serde")]
    pub cert_expiry: Option<Duration>,
    /// Store above this share of its quota. Default 90.
    #[serde(default = "default_quota_percent")]
    pub store_quota_percent: Option<u8>,
}

impl Default for AlertsFile {
    fn default() -> Self {
        AlertsFile {
            failed_auth: default_failed_auth(),
            admin_hours: None,
            bulk: default_bulk(),
            change_window: None,
            queue_depth: default_queue_depth(),
            queue_age: default_queue_age(),
            cert_expiry: default_cert_expiry(),
            store_quota_percent: default_quota_percent(),
        }
    }
}

/// A rule's table, or `false` to turn it off.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected false, or a table such as { threshold = 10, window = \"5m\" }"
)]
pub enum Toggle<T> {
    Off(bool),
    On(T),
}

fn default_failed_auth() -> Toggle<RateFile> {
    Toggle::On(RateFile {
        threshold: 10,
        window: Duration::from_secs(300),
    })
}
fn default_bulk() -> Toggle<RateFile> {
    Toggle::On(RateFile {
        threshold: 1000,
        window: Duration::from_secs(600),
    })
}
fn default_queue_depth() -> Option<u64> {
    Some(100_000)
}
fn default_queue_age() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}
fn default_cert_expiry() -> Option<Duration> {
    Some(Duration::from_secs(30 * 86_400))
}
fn default_quota_percent() -> Option<u8> {
    Some(90)
}

/// Validated `[audit]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    pub retention: Duration,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    pub journal_messages: bool,
    pub alerts: AlertSettings,
}

fn rate(cx: &Ctx<'_>, key: &str, t: Toggle<RateFile>) -> Result<Option<Rate>, super::ConfigError> {
    match t {
        Toggle::Off(false) => Ok(None),
        Toggle::Off(true) => Err(cx.err(key, "write a table (threshold, window) or false")),
        Toggle::On(r) if r.threshold == 0 || r.window.is_zero() => {
            Err(cx.err(key, "threshold and window must be more than zero"))
        }
        Toggle::On(r) => Ok(Some(Rate {
            threshold: r.threshold,
            window: r.window,
        })),
    }
}

pub(super) fn validate(
    cx: &Ctx<'_>,
    audit: AuditFile,
    alerts: AlertsFile,
) -> Result<AuditSettings, super::ConfigError> {
    if audit.retention < audit.legal_minimum {
        return Err(cx.err(
            "audit.retention",
            format!(
                "{} is below the legal minimum of {} (audit.legal_minimum)",
                humantime::format_duration(audit.retention),
                humantime::format_duration(audit.legal_minimum)
            ),
        ));
    }
    if audit.retention < Duration::from_secs(1) {
        return Err(cx.err("audit.retention", "must be at least 1s"));
    }
    if audit.checkpoint_every == 0 {
        return Err(cx.err("audit.checkpoint_every", "must be at least 1"));
    }
    if audit.checkpoint_interval < Duration::from_secs(1) {
        return Err(cx.err("audit.checkpoint_interval", "must be at least 1s"));
    }
    let window = |key: &str, w: Option<String>| -> Result<Option<TimeWindow>, _> {
        w.map(|t| t.parse::<TimeWindow>().map_err(|e| cx.err(key, e)))
            .transpose()
    };
    if alerts.store_quota_percent.is_some_and(|p| p > 100) {
        return Err(cx.err(
            "alerts.store_quota_percent",
            "must be from 1 to 100 (0 turns it off)",
        ));
    }
    let alert_settings = AlertSettings {
        failed_auth: rate(cx, "alerts.failed_auth", alerts.failed_auth)?,
        admin_hours: window("alerts.admin_hours", alerts.admin_hours)?,
        bulk: rate(cx, "alerts.bulk", alerts.bulk)?,
        change_window: window("alerts.change_window", alerts.change_window)?,
        // Zero turns a level rule off.
        queue_depth: alerts.queue_depth.filter(|d| *d > 0),
        queue_age: alerts.queue_age.filter(|d| !d.is_zero()),
        cert_expiry: alerts.cert_expiry.filter(|d| !d.is_zero()),
        store_quota_percent: alerts.store_quota_percent.filter(|p| *p > 0),
    };
    Ok(AuditSettings {
        retention: audit.retention,
        checkpoint_every: audit.checkpoint_every,
        checkpoint_interval: audit.checkpoint_interval,
        journal_messages: audit.journal_messages,
        alerts: alert_settings,
    })
}
