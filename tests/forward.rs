//! Promise 2, store and forward, against third-party upstreams (python-hl7 over MLLP and MLLP
//! over TLS with and without client certificates, hl7apy's MLLPServer): every acknowledged
//! message reaches each routed destination, in order, or lands in dead letters; outages, AE/AR
//! answers, poison messages, the store quota and TLS failures. Each test starts the real binary
//! and real upstream processes; "eventually" is a bounded poll on the upstream's log or on
//! `hl7edge queue status --json`, never a sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use common::*;

/// Polls until `up`'s log holds `n` entries answered AA.
fn wait_aa(inst: &Instance, up: &Upstream, n: usize) -> Vec<String> {
    wait_for(inst, &format!("{n} AA at {}", up.log.display()), 60, || {
        let aa = ids_with(&up.received(), "AA");
        (aa.len() >= n).then_some(aa)
    })
}

/// Polls until destination `name` has an empty queue.
fn wait_drained(inst: &Instance, name: &str) -> serde_json::Value {
    wait_for(inst, &format!("{name} drained"), 60, || {
        let d = inst.dest_status(name);
        (d["depth"] == 0).then_some(d)
    })
}

fn assert_aa(ack: &str) {
    assert_eq!(ack_code(ack).as_deref(), Some("AA"), "{ack}");
}

fn sent_ids(stream: &[(&str, &str, String)]) -> Vec<String> {
    stream.iter().map(|(_, _, c)| c.clone()).collect()
}

#[test]
fn mixed_stream_fans_out_in_order_to_python_hl7_plain_tls_mtls_and_hl7apy() {
    let dir = tempfile::tempdir().unwrap();
    let upki = devpki::generate(&dir.path().join("upstream-tls"), "unused").unwrap();
    let plain = Upstream::python_hl7(&dir.path().join("plain.log"), 0, &[]);
    let tls = Upstream::python_hl7_tls(&dir.path().join("tls.log"), 0, &upki, false, &[]);
    let mtls = Upstream::python_hl7_tls(&dir.path().join("mtls.log"), 0, &upki, true, &[]);
    let apy = Upstream::hl7apy(&dir.path().join("apy.log"), 0);

    // The hl7apy destination takes max_attempts = 1: a peer that closes after each reply is
    // no failed attempt of the next message, so nothing may become poison there.
    let extra = mllp_destination("plain", plain.port, "")
        + &mllps_destination("tls", tls.port, &upki.ca_cert, "")
        + &mllps_destination(
            "mtls",
            mtls.port,
            &upki.ca_cert,
            &format!(
                "client_cert = \"{}\"\nclient_key = \"{}\"\n",
                upki.client_cert.display(),
                upki.client_key.display()
            ),
        )
        + &mllp_destination("apy", apy.port, "max_attempts = 1\n")
        + &route("everything", &[], &[], &["plain"])
        + &route("adt", &["ADT^*"], &[], &["tls"])
        + &route("lab", &[], &["LAB"], &["mtls"])
        + &route("orders-results", &["ORM^O01", "ORU^R01"], &[], &["apy"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();

    let kinds = [
        ("EHR", "ADT^A01^ADT_A01"),
        ("LAB", "ORU^R01^ORU_R01"),
        ("EHR", "ADT^A08^ADT_A01"),
        ("RIS", "ORM^O01^ORM_O01"),
        ("LAB", "ADT^A08^ADT_A01"),
        ("RIS", "ORU^R01^ORU_R01"),
    ];
    let stream: Vec<(&str, &str, String)> = (0..36)
        .map(|i| {
            let (app, ty) = kinds[i % kinds.len()];
            (app, ty, format!("MIX{i:03}"))
        })
        .collect();
    // The first half one message per connection (the harness), the second half through
    // python-hl7's mllp_send on one connection.
    let (first, second) = stream.split_at(18);
    for (app, ty, ctrl) in first {
        assert_aa(&send_plain(inst.plain_addr(), &hl7_message(app, ty, ctrl)).unwrap());
    }
    let file = inst.dir.path().join("second-half.hl7");
    let text: Vec<String> = second
        .iter()
        .map(|(app, ty, ctrl)| hl7_message(app, ty, ctrl).replace('\r', "\n"))
        .collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    let out = mllp_send(inst.mllp_port, &file);
    let acks = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(acks.matches("MSA|AA|MIX").count(), second.len(), "{acks}");

    let want = |keep: &dyn Fn(&str, &str) -> bool| -> Vec<String> {
        stream
            .iter()
            .filter(|(app, ty, _)| keep(app, ty))
            .map(|(_, _, c)| c.clone())
            .collect()
    };
    let expect = [
        (&plain, "plain", sent_ids(&stream)),
        (&tls, "tls", want(&|_, ty| ty.starts_with("ADT^"))),
        (&mtls, "mtls", want(&|app, _| app == "LAB")),
        (
            &apy,
            "apy",
            want(&|_, ty| ty.starts_with("ORM^O01") || ty.starts_with("ORU^R01")),
        ),
    ];
    for (up, name, ids) in &expect {
        let got = wait_aa(&inst, up, ids.len());
        // Complete, in send order, nothing else and nothing twice (no failure happened).
        assert_eq!(&got, ids, "{name}: {}", up.stderr());
        assert_eq!(
            up.received().len(),
            ids.len(),
            "{name}: {:?}",
            up.received()
        );
        let d = wait_drained(&inst, name);
        assert_eq!(d["dead_letters"], 0, "{name}: {d}");
        assert_eq!(d["live"]["delivered"], ids.len() as u64, "{name}: {d}");
    }
    // The message types arrive unchanged.
    let types: Vec<String> = plain
        .received()
        .iter()
        .map(|r| r.message_type.clone())
        .collect();
    let sent_types: Vec<String> = stream.iter().map(|(_, ty, _)| ty.to_string()).collect();
    assert_eq!(types, sent_types);

    // The table output, from the running engine and from the store once it is stopped.
    let out = inst.cli(&["queue", "status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}");
    assert!(table.contains("engine: running"), "{table}");
    for name in ["plain", "tls", "mtls", "apy"] {
        assert!(table.lines().any(|l| l.starts_with(name)), "{table}");
    }
    assert_eq!(inst.stop(), Some(0), "{}", inst.log());
    let out = inst.cli(&["queue", "status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}");
    assert!(table.contains("engine: stopped"), "{table}");
    let line = table.lines().find(|l| l.starts_with("plain")).unwrap();
    assert!(line.contains("stopped"), "{table}");
    let stopped = inst.queue_json(&["status"]);
    assert_eq!(stopped["engine_running"], false, "{stopped}");
    for d in stopped["destinations"].as_array().unwrap() {
        assert_eq!(d["depth"], 0, "{stopped}");
    }
}

#[test]
fn upstream_down_then_up_gets_the_queue_in_order_without_duplicates() {
    let port = free_port();
    let extra = mllp_destination("hosp", port, "ack_timeout = \"30s\"\n")
        + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (0..30).map(|i| format!("DOWN{i:02}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for (i, id) in ids.iter().enumerate() {
        let ty = ["ADT^A01^ADT_A01", "ORU^R01^ORU_R01", "ORM^O01^ORM_O01"][i % 3];
        assert_aa(&c.send(&hl7_message("EHR", ty, id)));
    }
    // Queued while the upstream is down, and the status says why.
    // (The figures in redb follow the write-ahead log within milliseconds: poll.)
    let d = wait_for(
        &inst,
        "30 queued and the connection failure in queue status",
        30,
        || {
            let d = inst.dest_status("hosp");
            let why = d["live"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("connect"));
            (why && d["depth"] == 30).then_some(d)
        },
    );
    assert_eq!(d["live"]["delivered"], 0, "{d}");
    assert!(d["oldest_queued_ms"].is_u64(), "{d}");

    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), port, &[]);
    let got = wait_aa(&inst, &up, ids.len());
    assert_eq!(got, ids);
    wait_drained(&inst, "hosp");
    assert_eq!(
        up.received().len(),
        ids.len(),
        "duplicates: {:?}",
        up.received()
    );
    // Messages after the outage follow.
    assert_aa(&c.send(&hl7_message("EHR", "ADT^A08^ADT_A01", "DOWNAFTER")));
    let got = wait_aa(&inst, &up, ids.len() + 1);
    assert_eq!(got.last().map(String::as_str), Some("DOWNAFTER"));
}

#[test]
fn ae_then_aa_is_retried_and_nothing_overtakes_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &["--ae", "RT3:2"]);
    let extra = mllp_destination("hosp", up.port, "") + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (1..=6).map(|i| format!("RT{i}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in &ids {
        assert_aa(&c.send(&hl7_message("LAB", "ORU^R01^ORU_R01", id)));
    }
    let got = wait_aa(&inst, &up, ids.len());
    assert_eq!(got, ids);
    let log = up.received();
    let codes: Vec<(&str, &str)> = log
        .iter()
        .map(|r| (r.control_id.as_str(), r.code.as_str()))
        .collect();
    assert_eq!(
        codes,
        [
            ("RT1", "AA"),
            ("RT2", "AA"),
            ("RT3", "AE"),
            ("RT3", "AE"),
            ("RT3", "AA"),
            ("RT4", "AA"),
            ("RT5", "AA"),
            ("RT6", "AA")
        ]
    );
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_eq!(d["live"]["retried"], 2, "{d}");
}

#[test]
fn ar_goes_to_dead_letters_the_queue_goes_on_and_replay_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("up.log");
    let mut up = Upstream::python_hl7(&log, port, &["--ar", "AR3:-1"]);
    let extra = mllp_destination("hosp", port, "") + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (1..=6).map(|i| format!("AR{i}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in &ids {
        assert_aa(&c.send(&hl7_message("RIS", "ORM^O01^ORM_O01", id)));
    }
    let got = wait_aa(&inst, &up, 5);
    assert_eq!(got, ["AR1", "AR2", "AR4", "AR5", "AR6"]);
    assert_eq!(ids_with(&up.received(), "AR"), ["AR3"], "sent once");
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 1, "{d}");

    // The dead letter, from the running engine: which message, why, the last answer.
    let dead = inst.dead_letters("hosp");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let l = &dead[0];
    assert_eq!(l["meta"]["control_id"], "AR3", "{l}");
    assert_eq!(l["meta"]["message_type"], "ORM^O01^ORM_O01", "{l}");
    assert_eq!(l["letter"]["last_ack"], "AR", "{l}");
    assert_eq!(l["letter"]["attempts"], 1, "{l}");
    assert!(
        l["letter"]["reason"].as_str().unwrap().contains("rejected"),
        "{l}"
    );
    let id = l["letter"]["message_id"].as_u64().unwrap();

    // The hospital fixes its side; the operator replays the message: it arrives, at the back.
    up.stop();
    let up = Upstream::python_hl7(&log, port, &[]);
    let out = inst.cli(&["queue", "replay", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = wait_aa(&inst, &up, 6);
    assert_eq!(got, ["AR1", "AR2", "AR4", "AR5", "AR6", "AR3"]);
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert!(inst.dead_letters("hosp").is_empty());
    // Replaying it again finds nothing.
    let out = inst.cli(&["queue", "replay", &id.to_string()]);
    assert!(!out.status.success());
}

#[test]
fn poison_message_is_dead_lettered_after_max_attempts_and_the_rest_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &["--ae", "PS2:-1"]);
    let extra = mllp_destination("hosp", up.port, "max_attempts = 3\n")
        + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (1..=5).map(|i| format!("PS{i}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in &ids {
        assert_aa(&c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", id)));
    }
    let got = wait_aa(&inst, &up, 4);
    assert_eq!(got, ["PS1", "PS3", "PS4", "PS5"]);
    let log = up.received();
    assert_eq!(ids_with(&log, "AE"), ["PS2", "PS2", "PS2"]);
    // Nothing behind it was sent while it was being retried.
    let last_ps2 = log.iter().rposition(|r| r.control_id == "PS2").unwrap();
    let first_ps3 = log.iter().position(|r| r.control_id == "PS3").unwrap();
    assert!(last_ps2 < first_ps3, "{log:?}");
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 1, "{d}");
    let dead = inst.dead_letters("hosp");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let l = &dead[0];
    assert_eq!(l["meta"]["control_id"], "PS2", "{l}");
    assert_eq!(l["letter"]["attempts"], 3, "{l}");
    assert_eq!(l["letter"]["last_ack"], "AE", "{l}");
    assert!(
        l["letter"]["reason"].as_str().unwrap().contains("poison"),
        "{l}"
    );
    // The operator gives up on it: discarded, it leaves the dead letters and is never sent.
    let id = l["letter"]["message_id"].as_u64().unwrap().to_string();
    let out = inst.cli(&["queue", "discard", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inst.dead_letters("hosp").is_empty());
    assert_eq!(inst.dest_status("hosp")["dead_letters"], 0);
    assert_eq!(ids_with(&up.received(), "AE").len(), 3);
}

#[test]
fn message_failing_longer_than_max_age_is_dead_lettered_long_before_max_attempts() {
    // Two destinations with the same retry settings and max_attempts = 1000, each on its own
    // upstream answering AE to AGE2 forever: "hosp" also has max_age = 2s, "noage" has none.
    // AGE2 must die of age at hosp (and the queue go on), and still be retried at noage.
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &["--ae", "AGE2:-1"]);
    let ctl = Upstream::python_hl7(&dir.path().join("ctl.log"), 0, &["--ae", "AGE2:-1"]);
    let extra = mllp_destination("hosp", up.port, "max_attempts = 1000\nmax_age = \"2s\"\n")
        + &mllp_destination("noage", ctl.port, "max_attempts = 1000\n")
        + &route("all", &[], &[], &["hosp", "noage"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in ["AGE1", "AGE2", "AGE3"] {
        assert_aa(&c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", id)));
    }

    // Once AGE2 has failed for longer than max_age it is dead, and AGE3 behind it goes on.
    let got = wait_aa(&inst, &up, 2);
    assert_eq!(got, ["AGE1", "AGE3"], "{:?}", up.received());
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 1, "{d}");
    let dead = inst.dead_letters("hosp");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let l = &dead[0];
    assert_eq!(l["meta"]["control_id"], "AGE2", "{l}");
    assert_eq!(l["letter"]["last_ack"], "AE", "{l}");
    let attempts = l["letter"]["attempts"].as_u64().unwrap();
    let reason = l["letter"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("poison")
            && reason.contains("older than max_age")
            && reason.contains(&format!("after {attempts} attempts")),
        "{l}"
    );
    // It died of age: retried first (so not at its first failure), older than max_age when it
    // died and soon after (retry_max is 500ms), and far below max_attempts.
    assert!(attempts >= 2, "{l}");
    assert!(attempts < 1000, "{l}");
    let age = l["letter"]["dead_ms"].as_u64().unwrap() - l["letter"]["queued_ms"].as_u64().unwrap();
    assert!(
        (2000..10_000).contains(&age),
        "died {age} ms after queueing: {l}"
    );
    // The letter's count is what the upstream saw, and nothing behind AGE2 was sent before its
    // last attempt.
    let log = up.received();
    assert_eq!(ids_with(&log, "AE").len() as u64, attempts, "{log:?}");
    let last_age2 = log.iter().rposition(|r| r.control_id == "AGE2").unwrap();
    let first_age3 = log.iter().position(|r| r.control_id == "AGE3").unwrap();
    assert!(last_age2 < first_age3, "{log:?}");

    // Without max_age, max_attempts alone has not made it poison: it is still being retried at
    // noage, with everything behind it waiting, and nothing is dead there.
    let ae_so_far = ids_with(&ctl.received(), "AE").len();
    let d = wait_for(
        &inst,
        "noage to retry AGE2 more often than hosp did",
        30,
        || {
            let d = inst.dest_status("noage");
            let more = ids_with(&ctl.received(), "AE").len() > ae_so_far.max(attempts as usize);
            (more && d["live"]["state"] == "retrying").then_some(d)
        },
    );
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_eq!(d["depth"], 2, "{d}");
    assert!(inst.dead_letters("noage").is_empty());
    assert_eq!(
        ids_with(&ctl.received(), "AA"),
        ["AGE1"],
        "{:?}",
        ctl.received()
    );

    // A later message on hosp is delivered: the queue goes on.
    assert_aa(&c.send(&hl7_message("EHR", "ADT^A08^ADT_A01", "AGE4")));
    let got = wait_aa(&inst, &up, 3);
    assert_eq!(got, ["AGE1", "AGE3", "AGE4"]);
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 1, "{d}");
    assert_eq!(d["live"]["delivered"], 3, "{d}");
    assert_eq!(
        ids_with(&up.received(), "AE").len() as u64,
        attempts,
        "sent again"
    );
}

#[test]
fn unanswered_message_is_sent_again_after_ack_timeout_and_nothing_overtakes_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &["--hang", "HG2:1"]);
    let extra = mllp_destination("hosp", up.port, "ack_timeout = \"1s\"\n")
        + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (1..=4).map(|i| format!("HG{i}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in &ids {
        assert_aa(&c.send(&hl7_message("EHR", "ADT^A08^ADT_A01", id)));
    }
    let got = wait_aa(&inst, &up, ids.len());
    // (A loaded machine may time out on another message too: at least once, in order.)
    let aa: Vec<Received> = up
        .received()
        .into_iter()
        .filter(|r| r.code == "AA")
        .collect();
    assert_eq!(first_occurrences(&aa), ids, "{got:?}");
    let log = up.received();
    assert_eq!(ids_with(&log, "HANG"), ["HG2"], "{log:?}");
    let hang = log.iter().position(|r| r.code == "HANG").unwrap();
    let hg2_aa = log
        .iter()
        .position(|r| r.control_id == "HG2" && r.code == "AA")
        .unwrap();
    assert!(
        log[..hg2_aa]
            .iter()
            .all(|r| r.control_id == "HG1" || r.control_id == "HG2"),
        "{log:?}"
    );
    assert!(hang < hg2_aa);
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 0, "{d}");
}

#[test]
fn poison_message_with_on_poison_block_holds_the_queue_until_the_upstream_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("up.log");
    let mut up = Upstream::python_hl7(&log, port, &["--ae", "BL2:-1"]);
    let extra = mllp_destination("hosp", port, "max_attempts = 2\non_poison = \"block\"\n")
        + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let ids: Vec<String> = (1..=5).map(|i| format!("BL{i}")).collect();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in &ids {
        assert_aa(&c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", id)));
    }
    // Past max_attempts it is retried, blocked, and nothing behind it moves.
    let d = wait_for(&inst, "state blocked", 30, || {
        let d = inst.dest_status("hosp");
        let ae = ids_with(&up.received(), "AE").len();
        (d["live"]["state"] == "blocked" && ae > 2 && d["depth"] == 4).then_some(d)
    });
    assert_eq!(d["dead_letters"], 0, "{d}");
    let log_now = up.received();
    assert_eq!(ids_with(&log_now, "AA"), ["BL1"], "{log_now:?}");
    assert!(
        log_now
            .iter()
            .all(|r| r.control_id == "BL1" || r.control_id == "BL2"),
        "{log_now:?}"
    );
    assert!(inst.dead_letters("hosp").is_empty());

    up.stop();
    let up = Upstream::python_hl7(&log, port, &[]);
    let got = wait_aa(&inst, &up, 5);
    assert_eq!(got, ids);
    let d = wait_drained(&inst, "hosp");
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_ne!(d["live"]["state"], "blocked", "{d}");
}

#[test]
fn quota_answers_ae_while_the_upstream_is_down_and_aa_again_after_it_drains() {
    let port = free_port();
    let extra = format!(
        "\n[store]\nquota = \"64KiB\"\nretention = \"1ms\"\n{}{}",
        mllp_destination("hosp", port, ""),
        route("all", &[], &[], &["hosp"])
    );
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let filler = format!("NTE|1||{}\r", "Q".repeat(2000));
    let mut c = MllpConn::connect(inst.plain_addr());
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..200 {
        let id = format!("QT{i:03}");
        let ack = c.send(&(hl7_message("EHR", "ADT^A01^ADT_A01", &id) + &filler));
        match ack_code(&ack).as_deref() {
            Some("AA") => acked.push(id),
            Some("AE") => {
                full = Some(ack);
                break;
            }
            other => panic!("unexpected {other:?}: {ack}"),
        }
    }
    let ae = full.expect("the quota was never reached");
    assert!(ae.contains("storage is full"), "{ae}");
    assert!(acked.len() >= 10, "{} AA before the quota", acked.len());
    // Still full: AE again, never AA, while nothing drains.
    let ack = c.send(&(hl7_message("EHR", "ADT^A01^ADT_A01", "QTFULL2") + &filler));
    assert_eq!(ack_code(&ack).as_deref(), Some("AE"), "{ack}");
    let st = inst.queue_json(&["status"]);
    assert!(st["stored_bytes"].as_u64().unwrap() <= 64 * 1024, "{st}");

    // The upstream comes up: the queue drains, retention deletes what was delivered, and the
    // freed space takes messages again.
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), port, &[]);
    let got = wait_aa(&inst, &up, acked.len());
    assert_eq!(
        got, acked,
        "the AE'd messages were never stored, so never sent"
    );
    wait_drained(&inst, "hosp");
    wait_for(&inst, "retention to free the store", 30, || {
        let st = inst.queue_json(&["status"]);
        (st["stored_bytes"] == 0).then_some(())
    });
    for i in 0..5 {
        let id = format!("QTAGAIN{i}");
        assert_aa(&c.send(&(hl7_message("EHR", "ADT^A01^ADT_A01", &id) + &filler)));
        acked.push(id);
    }
    let got = wait_aa(&inst, &up, acked.len());
    assert_eq!(got, acked);
}

#[test]
fn tls_name_mismatch_unknown_ca_and_wrong_pin_send_nothing_and_say_why() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let upki = devpki::generate(&dir.path().join("upstream-tls"), "unused").unwrap();
    let other = devpki::generate(&dir.path().join("other-ca"), "unused").unwrap();
    let bad = Upstream::python_hl7_tls(&dir.path().join("bad.log"), 0, &upki, false, &[]);
    let good = Upstream::python_hl7_tls(&dir.path().join("good.log"), 0, &upki, false, &[]);
    let mut pin = [0u8; 32];
    getrandom::fill(&mut pin).unwrap();
    let pin = base64::engine::general_purpose::STANDARD.encode(pin);
    let name_dest = format!(
        "\n[[destination]]\nname = \"badname\"\nkind = \"mllps\"\naddress = \"127.0.0.1:{}\"\n\
         server_name = \"hospital.example.org\"\nca = \"{}\"\nretry_initial = \"50ms\"\n\
         retry_max = \"500ms\"\n",
        bad.port,
        upki.ca_cert.display()
    );
    let extra = name_dest
        + &mllps_destination("badca", bad.port, &other.ca_cert, "")
        + &mllps_destination(
            "badpin",
            bad.port,
            &upki.ca_cert,
            &format!("pin_sha256 = [\"{pin}\"]\n"),
        )
        + &mllps_destination("good", good.port, &upki.ca_cert, "")
        + &route("all", &[], &[], &["badname", "badca", "badpin", "good"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    assert_aa(
        &send_plain(
            inst.plain_addr(),
            &hl7_message("EHR", "ADT^A01^ADT_A01", "TLS1"),
        )
        .unwrap(),
    );
    // The same message reaches a correctly configured destination on the same CA.
    assert_eq!(wait_aa(&inst, &good, 1), ["TLS1"]);

    let error_of = |name: &str, needles: &[&str]| -> serde_json::Value {
        wait_for(
            &inst,
            &format!("{name}: last_error naming {needles:?}"),
            30,
            || {
                let d = inst.dest_status(name);
                let e = d["live"]["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .to_lowercase();
                needles.iter().all(|n| e.contains(n)).then_some(d)
            },
        )
    };
    let d = error_of("badname", &["certificate", "name"]);
    assert_eq!(d["depth"], 1, "{d}");
    let d = error_of("badca", &["certificate"]);
    assert_eq!(d["depth"], 1, "{d}");
    let d = error_of("badpin", &["pin"]);
    assert_eq!(d["depth"], 1, "{d}");
    for name in ["badname", "badca", "badpin"] {
        let d = inst.dest_status(name);
        assert_eq!(d["live"]["delivered"], 0, "{d}");
        assert_eq!(
            d["dead_letters"], 0,
            "a connection failure is not the message's fault: {d}"
        );
    }
    // Nothing reached the upstream the three destinations point at.
    assert!(bad.received().is_empty(), "{:?}", bad.received());
    // And still nothing after more connection attempts.
    let before = inst.dest_status("badpin")["live"]["last_error_ms"]
        .as_u64()
        .unwrap();
    wait_for(&inst, "another failed attempt", 30, || {
        let ms = inst.dest_status("badpin")["live"]["last_error_ms"].as_u64()?;
        (ms > before).then_some(())
    });
    assert!(bad.received().is_empty(), "{:?}", bad.received());
}

#[test]
fn mutual_tls_upstream_refusing_our_missing_client_certificate_is_a_connection_failure() {
    let dir = tempfile::tempdir().unwrap();
    let upki = devpki::generate(&dir.path().join("upstream-tls"), "unused").unwrap();
    let up = Upstream::python_hl7_tls(&dir.path().join("up.log"), 0, &upki, true, &[]);
    // No client_cert: the upstream's TLS 1.3 refuses us after our side of the handshake ended.
    let extra = mllps_destination("hosp", up.port, &upki.ca_cert, "max_attempts = 2\n")
        + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();
    assert_aa(
        &send_plain(
            inst.plain_addr(),
            &hl7_message("EHR", "ADT^A01^ADT_A01", "NOCERT1"),
        )
        .unwrap(),
    );
    let failure = |after: u64| {
        wait_for(
            &inst,
            "a failed connection naming the client certificate",
            30,
            || {
                let d = inst.dest_status("hosp");
                let e = d["live"]["last_error"].as_str().unwrap_or("");
                let ms = d["live"]["last_error_ms"].as_u64().unwrap_or(0);
                (e.contains("client certificate") && ms > after).then_some(d)
            },
        )
    };
    let d = failure(0);
    // Retried as a connection failure, several times, never counted against the message.
    let d = failure(d["live"]["last_error_ms"].as_u64().unwrap());
    let d = failure(d["live"]["last_error_ms"].as_u64().unwrap());
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_eq!(d["depth"], 1, "{d}");
    assert_eq!(d["live"]["retried"], 0, "{d}");
    assert!(inst.dead_letters("hosp").is_empty());
    assert!(up.received().is_empty(), "{:?}", up.received());
}
