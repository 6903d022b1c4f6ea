//! Alert rules (the seed's list): each alert is an audit record (`alert.<rule>`, severity
//! alert), a journald line at priority alert, and a count in the metrics.
//!
//! Rate rules (failed authentications, bulk export or replay) count events in a sliding window
//! and fire once per window. Time rules (administrative access outside allowed hours, a
//! configuration change outside its window) fire per event. Level rules (queue depth, oldest
//! age, store near its quota) fire when the level is crossed and re-arm once it is back below.
//! Certificate expiry is checked at start and every day.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use super::{Event, Severity};

/// N events within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub threshold: u64,
    pub window: Duration,
}

/// Days of the week and a time of day range, in UTC: `Mon-Fri 07:00-19:00`, `Sat,Sun
/// 00:00-24:00`, `22:00-06:00` (every day; a range may wrap past midnight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    /// Monday first.
    days: [bool; 7],
    start_min: u32,
    end_min: u32,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_hhmm(t: &str) -> Option<u32> {
    let (h, m) = t.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

fn parse_day(d: &str) -> Option<usize> {
    let d = d.trim().to_ascii_lowercase();
    DAYS.iter().position(|x| d.starts_with(x) && d.len() >= 3)
}

impl std::str::FromStr for TimeWindow {
    type Err = String;

    fn from_str(text: &str) -> Result<TimeWindow, String> {
        let bad =
            || format!("{text:?} is not a time window: write e.g. \"Mon-Fri 07:00-19:00\" (UTC)");
        let text = text.trim();
        let (days_text, range) = match text.rsplit_once(' ') {
            Some((d, r)) => (Some(d.trim()), r),
            None => (None, text),
        };
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let (start_min, end_min) = (
            parse_hhmm(a).ok_or_else(bad)?,
            parse_hhmm(b).ok_or_else(bad)?,
        );
        let mut days = [days_text.is_none(); 7];
        if let Some(list) = days_text {
            for part in list.split(',') {
                match part.split_once('-') {
                    Some((from, to)) => {
                        let (from, to) = (
                            parse_day(from).ok_or_else(bad)?,
                            parse_day(to).ok_or_else(bad)?,
                        );
                        let mut d = from;
                        loop {
                            days[d] = true;
                            if d == to {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => days[parse_day(part).ok_or_else(bad)?] = true,
                }
            }
        }
        Ok(TimeWindow {
            days,
            start_min,
            end_min,
        })
    }
}

impl TimeWindow {
    /// Whether `time_ms` (Unix milliseconds) falls inside the window.
    pub fn contains(&self, time_ms: u64) -> bool {
        let days_since_epoch = time_ms / 86_400_000;
        // 1970-01-01 was a Thursday (index 3, Monday first).
        let weekday = ((days_since_epoch + 3) % 7) as usize;
        let minute = ((time_ms % 86_400_000) / 60_000) as u32;
        if self.start_min <= self.end_min {
            self.days[weekday] && (self.start_min..self.end_min).contains(&minute)
        } else {
            // Wraps past midnight: the evening part belongs to its day, the morning part to
            // the day before.
            let yesterday = (weekday + 6) % 7;
            (self.days[weekday] && minute >= self.start_min)
                || (self.days[yesterday] && minute < self.end_min)
        }
    }
}

/// The rules in force; `None` turns one off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertSettings {
    pub failed_auth: Option<Rate>,
    /// When administrative access is expected; outside it each access alerts.
    pub admin_hours: Option<TimeWindow>,
    /// Records exported plus dead letters replayed.
    pub bulk: Option<Rate>,
    /// When configuration changes are expected.
    pub change_window: Option<TimeWindow>,
    pub queue_depth: Option<u64>,
    pub queue_age: Option<Duration>,
    pub cert_expiry: Option<Duration>,
    pub store_quota_percent: Option<u8>,
}

/// What a rule needs of the engine's state for the level rules.
pub struct Levels<'a> {
    /// `(destination, depth, oldest queued ms)`.
    pub queues: &'a [(String, u64, Option<u64>)],
    pub stored_bytes: u64,
    pub quota: u64,
}

fn alert(rule: &str, time_ms: u64, text: String) -> Event {
    Event {
        time_ms,
        ..Event::new(&format!("alert.{rule}"))
    }
    .severity(Severity::Alert)
    .with("rule", rule)
    .with("text", text)
}

/// Rule state. One lives in the store's applier, which sees every audit event.
#[derive(Debug, Default, Clone)]
pub struct Alerter {
    settings: AlertSettings,
    failed: VecDeque<u64>,
    bulk: VecDeque<(u64, u64)>,
    /// Rate rules: when each last fired.
    last_fired: BTreeMap<&'static str, u64>,
    /// Level rules currently above their threshold (`rule/subject`).
    active: HashSet<String>,
}

impl Alerter {
    pub fn new(settings: AlertSettings) -> Alerter {
        Alerter {
            settings,
            ..Alerter::default()
        }
    }

    fn rate_fires(&mut self, rule: &'static str, now: u64, window: Duration) -> bool {
        let w = window.as_millis() as u64;
        match self.last_fired.get(rule) {
            Some(t) if now.saturating_sub(*t) < w => false,
            _ => {
                self.last_fired.insert(rule, now);
                true
            }
        }
    }

    /// The alerts an audit event raises.
    pub fn observe(&mut self, e: &Event) -> Vec<Event> {
        let mut out = Vec::new();
        let now = e.time_ms;
        if e.event.starts_with("alert.") {
            return out;
        }
        if let Some(r) = self.settings.failed_auth {
            if e.event == "auth.failed" {
                let w = r.window.as_millis() as u64;
                // A record may stand for failures folded into it (rate-limited per peer).
                let folded = e
                    .detail
                    .get("folded_before")
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
                    .min(10_000);
                for _ in 0..=folded {
                    self.failed.push_back(now);
                }
                while self
                    .failed
                    .front()
                    .is_some_and(|t| now.saturating_sub(*t) >= w)
                {
                    self.failed.pop_front();
                }
                let n = self.failed.len() as u64;
                if n >= r.threshold && self.rate_fires("failed_auth", now, r.window) {
                    out.push(
                        alert(
                            "failed_auth",
                            now,
                            format!(
                                "{n} failed authentications within {}",
                                humantime::format_duration(r.window)
                            ),
                        )
                        .with("count", n),
                    );
                }
            }
        }
        if let Some(hours) = &self.settings.admin_hours {
            if e.event.starts_with("admin.") && !hours.contains(now) {
                out.push(
                    alert(
                        "after_hours_admin",
                        now,
                        format!(
                            "administrative access ({}) outside the allowed hours",
                            e.event
                        ),
                    )
                    .with("access", &e.event)
                    .with("by", e.actor.as_deref().unwrap_or("-")),
                );
            }
        }
        if let Some(r) = self.settings.bulk {
            let n = match e.event.as_str() {
                "admin.audit_export" | "admin.queue_replay" => e
                    .detail
                    .get("count")
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0),
                _ => 0,
            };
            if n > 0 {
                let w = r.window.as_millis() as u64;
                self.bulk.push_back((now, n));
                while self
                    .bulk
                    .front()
                    .is_some_and(|(t, _)| now.saturating_sub(*t) >= w)
                {
                    self.bulk.pop_front();
                }
                let total: u64 = self.bulk.iter().map(|(_, n)| n).sum();
                if total >= r.threshold && self.rate_fires("bulk", now, r.window) {
                    out.push(
                        alert(
                            "bulk",
                            now,
                            format!(
                                "{total} records exported or messages replayed within {}",
                                humantime::format_duration(r.window)
                            ),
                        )
                        .with("count", total)
                        .with("by", e.actor.as_deref().unwrap_or("-")),
                    );
                }
            }
        }
        if let Some(win) = &self.settings.change_window {
            if e.event == "config.changed" && !win.contains(now) {
                out.push(
                    alert(
                        "config_change_outside_window",
                        now,
                        "the configuration changed outside its change window".into(),
                    )
                    .with("new_hash", e.detail.get("new_hash").map_or("-", |s| s)),
                );
            }
            // Certificates swapped by a reload change what the box trusts and presents.
            if e.event == "tls.reloaded" && !win.contains(now) {
                out.push(
                    alert(
                        "tls_reload_outside_window",
                        now,
                        "TLS certificates were reloaded outside the change window".into(),
                    )
                    .with("listeners", e.detail.get("listeners").map_or("-", |s| s))
                    .with(
                        "destinations",
                        e.detail.get("destinations").map_or("-", |s| s),
                    ),
                );
            }
        }
        out
    }

    fn level(&mut self, key: String, above: bool) -> bool {
        if above {
            self.active.insert(key)
        } else {
            self.active.remove(&key);
            false
        }
    }

    /// The alerts the engine's current levels raise (call every few seconds).
    pub fn levels(&mut self, now: u64, l: &Levels<'_>) -> Vec<Event> {
        let mut out = Vec::new();
        for (dest, depth, oldest) in l.queues {
            if let Some(max) = self.settings.queue_depth {
                if self.level(format!("queue_depth/{dest}"), *depth > max) {
                    out.push(
                        alert(
                            "queue_depth",
                            now,
                            format!("queue of {dest} holds {depth} messages (threshold {max})"),
                        )
                        .destination(dest.as_str())
                        .with("depth", depth),
                    );
                }
            }
            if let Some(max) = self.settings.queue_age {
                let age = oldest.map_or(0, |t| now.saturating_sub(t));
                if self.level(format!("queue_age/{dest}"), age > max.as_millis() as u64) {
                    out.push(
                        alert(
                            "queue_age",
                            now,
                            format!(
                                "the oldest message queued for {dest} waits since {} s (threshold {})",
                                age / 1000,
                                humantime::format_duration(max)
                            ),
                        )
                        .destination(dest.as_str())
                        .with("age_s", age / 1000),
                    );
                }
            }
        }
        if let Some(pct) = self.settings.store_quota_percent {
            let limit = l.quota / 100 * pct as u64;
            if self.level("store_quota".into(), l.stored_bytes >= limit) {
                out.push(
                    alert(
                        "store_quota",
                        now,
                        format!(
                            "the store holds {} of its {} bytes quota (alert at {pct} %)",
                            l.stored_bytes, l.quota
                        ),
                    )
                    .with("stored_bytes", l.stored_bytes),
                );
            }
        }
        out
    }
}

/// Alerts for certificates that expire within `cert_expiry`: `(what, path)` pairs, e.g.
/// `("listener integration cert", path)`. Unreadable files are the start-up's business.
pub fn cert_alerts(s: &AlertSettings, certs: &[(String, PathBuf)], now_ms: u64) -> Vec<Event> {
    let Some(within) = s.cert_expiry else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (what, path) in certs {
        let Ok(pem) = std::fs::read(path) else {
            continue;
        };
        for der in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
            .filter_map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.ok())
        {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
                continue;
            };
            let not_after_ms = cert.validity().not_after.timestamp().max(0) as u64 * 1000;
            let left = not_after_ms.saturating_sub(now_ms);
            if left <= within.as_millis() as u64 {
                let subject = cert.subject().to_string();
                out.push(
                    alert(
                        "cert_expiry",
                        now_ms,
                        format!("{what} ({subject}) expires in {} days", left / 86_400_000),
                    )
                    .with("certificate", what)
                    .with("subject", subject)
                    .with("path", path.display())
                    .with("not_after_ms", not_after_ms),
                );
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// 2026-12-07 is a Monday.
    const MONDAY_MS: u64 = 1_796_601_600_000;

    fn at(day: u64, h: u64, m: u64) -> u64 {
        MONDAY_MS + day * 86_400_000 + h * 3_600_000 + m * 60_000
    }

    fn ev(kind: &str, t: u64) -> Event {
        Event {
            time_ms: t,
            event: kind.into(),
            ..Event::default()
        }
    }

    #[test]
    fn time_windows_parse_and_contain() {
        let w: TimeWindow = "Mon-Fri 07:00-19:00".parse().unwrap();
        assert!(w.contains(at(0, 7, 0)));
        assert!(w.contains(at(4, 18, 59)));
        assert!(!w.contains(at(0, 19, 0)));
        assert!(!w.contains(at(5, 12, 0)), "Saturday");
        let n: TimeWindow = "Sat 22:00-02:00".parse().unwrap();
        assert!(n.contains(at(5, 23, 0)));
        assert!(
            n.contains(at(6, 1, 0)),
            "Sunday early belongs to Saturday night"
        );
        assert!(!n.contains(at(6, 23, 0)));
        let every: TimeWindow = "00:00-24:00".parse().unwrap();
        assert!(every.contains(at(3, 12, 0)));
        let sat_sun: TimeWindow = "Sat,Sun 00:00-24:00".parse().unwrap();
        assert!(sat_sun.contains(at(6, 5, 0)) && !sat_sun.contains(at(2, 5, 0)));
        for bad in ["", "7-19", "Mon-Fry 07:00-19:00", "25:00-26:00"] {
            assert!(bad.parse::<TimeWindow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn failed_auth_fires_at_the_threshold_within_the_window_once() {
        let mut a = Alerter::new(AlertSettings {
            failed_auth: Some(Rate {
                threshold: 3,
                window: Duration::from_secs(60),
            }),
            ..AlertSettings::default()
        });
        let t = at(0, 10, 0);
        // Spread out: never 3 within a minute.
        for i in 0..5 {
            assert!(a.observe(&ev("auth.failed", t + i * 40_000)).is_empty());
        }
        let t = at(0, 11, 0);
        assert!(a.observe(&ev("auth.failed", t)).is_empty());
        assert!(a.observe(&ev("auth.failed", t + 1)).is_empty());
        let fired = a.observe(&ev("auth.failed", t + 2));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].event, "alert.failed_auth");
        assert_eq!(fired[0].severity, Severity::Alert);
        assert!(
            a.observe(&ev("auth.failed", t + 3)).is_empty(),
            "once per window"
        );
        assert!(a.observe(&ev("message.received", t + 4)).is_empty());
        // A record standing for failures folded into it counts them all.
        let mut b = Alerter::new(a.settings.clone());
        let f = b.observe(&ev("auth.failed", t).with("folded_before", 2));
        assert_eq!(f.len(), 1, "1 + 2 folded reach the threshold of 3");
    }

    #[test]
    fn admin_access_outside_hours_and_config_change_outside_window() {
        let mut a = Alerter::new(AlertSettings {
            admin_hours: Some("Mon-Fri 07:00-19:00".parse().unwrap()),
            change_window: Some("Sat 22:00-23:59".parse().unwrap()),
            ..AlertSettings::default()
        });
        assert!(a.observe(&ev("admin.queue_status", at(0, 9, 0))).is_empty());
        let f = a.observe(&ev("admin.queue_status", at(0, 23, 0)));
        assert_eq!(f[0].event, "alert.after_hours_admin");
        assert!(a.observe(&ev("forward.delivered", at(0, 23, 0))).is_empty());
        assert!(a.observe(&ev("config.changed", at(5, 22, 30))).is_empty());
        let f = a.observe(&ev("config.changed", at(2, 10, 0)));
        assert_eq!(f[0].event, "alert.config_change_outside_window");
        assert!(a.observe(&ev("tls.reloaded", at(5, 23, 0))).is_empty());
        let f = a.observe(&ev("tls.reloaded", at(3, 14, 0)).with("listeners", "integration"));
        assert_eq!(f[0].event, "alert.tls_reload_outside_window");
        assert_eq!(f[0].detail["listeners"], "integration");
        // A failed reload changed nothing.
        assert!(a.observe(&ev("tls.reload_failed", at(3, 14, 0))).is_empty());
    }

    #[test]
    fn bulk_export_or_replay_sums_counts_in_the_window() {
        let mut a = Alerter::new(AlertSettings {
            bulk: Some(Rate {
                threshold: 100,
                window: Duration::from_secs(600),
            }),
            ..AlertSettings::default()
        });
        let t = at(0, 10, 0);
        assert!(a
            .observe(&ev("admin.audit_export", t).with("count", 60))
            .is_empty());
        // Another 60 after the window: no alert.
        assert!(a
            .observe(&ev("admin.queue_replay", t + 700_000).with("count", 60))
            .is_empty());
        let f = a.observe(&ev("admin.queue_replay", t + 710_000).with("count", 50));
        assert_eq!(f[0].event, "alert.bulk");
        assert_eq!(f[0].detail["count"], "110");
    }

    #[test]
    fn level_rules_fire_on_crossing_and_rearm() {
        let mut a = Alerter::new(AlertSettings {
            queue_depth: Some(10),
            queue_age: Some(Duration::from_secs(60)),
            store_quota_percent: Some(90),
            ..AlertSettings::default()
        });
        let now = at(0, 10, 0);
        let lv = |depth: u64, oldest: Option<u64>, bytes: u64| {
            (vec![("hospital".to_string(), depth, oldest)], bytes)
        };
        let (q, b) = lv(5, Some(now - 1000), 10);
        let levels = Levels {
            queues: &q,
            stored_bytes: b,
            quota: 100,
        };
        assert!(a.levels(now, &levels).is_empty());
        let (q, b) = lv(11, Some(now - 120_000), 95);
        let levels = Levels {
            queues: &q,
            stored_bytes: b,
            quota: 100,
        };
        let f: Vec<String> = a
            .levels(now, &levels)
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            f,
            ["alert.queue_depth", "alert.queue_age", "alert.store_quota"]
        );
        assert!(a.levels(now, &levels).is_empty(), "fires once while above");
        let (q, b) = lv(0, None, 0);
        let calm = Levels {
            queues: &q,
            stored_bytes: b,
            quota: 100,
        };
        assert!(a.levels(now, &calm).is_empty());
        assert_eq!(a.levels(now, &levels).len(), 3, "re-armed below");
    }

    #[test]
    fn certificates_expiring_within_the_limit_alert() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, days: i64| {
            let mut p = rcgen::CertificateParams::new(vec!["x.example".into()]).unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let (y, m, d) = crate::hl7::time::civil_from_days((now + days * 86_400) / 86_400);
            p.not_after = rcgen::date_time_ymd(y as i32, m as u8, d as u8);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            let path = dir.path().join(format!("{name}.pem"));
            std::fs::write(&path, cert.pem()).unwrap();
            path
        };
        let soon = write("soon", 10);
        let later = write("later", 400);
        let s = AlertSettings {
            cert_expiry: Some(Duration::from_secs(30 * 86_400)),
            ..AlertSettings::default()
        };
        let certs = vec![
            ("listener a cert".to_string(), soon),
            ("listener b cert".to_string(), later),
        ];
        let f = cert_alerts(&s, &certs, crate::store::now_ms());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].detail["certificate"], "listener a cert");
        assert!(f[0].detail["subject"].contains("soon"));
    }
}
