//! Operating the store-and-forward engine: unrouted messages, the Prometheus endpoint, the
//! platform trust store for upstreams without a CA bundle, retention reusing the file's space
//! under steady load and `store compact` returning it, and the demo. Real binary, python-hl7
//! upstreams; "eventually" is a bounded poll, never a sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::*;

fn assert_code(ack: &str, code: &str) {
    assert_eq!(ack_code(ack).as_deref(), Some(code), "{ack}");
}

#[test]
fn unrouted_messages_are_rejected_or_kept_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &[]);
    let routes = mllp_destination("hosp", up.port, "") + &route("adt", &["ADT^*"], &[], &["hosp"]);

    // unrouted = "reject": AR with an ERR naming the type; nothing stored or sent.
    let mut inst = forwarding_instance(&format!("\n[intake]\nunrouted = \"reject\"\n{routes}"));
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    let ack = c.send(&hl7_message("LAB", "ORU^R01^ORU_R01", "UNR1"));
    assert_code(&ack, "AR");
    assert!(ack.contains("ERR|") && ack.contains("no route"), "{ack}");
    assert_code(
        &c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", "RTD1")),
        "AA",
    );
    wait_for(&inst, "RTD1 delivered", 60, || {
        (ids_with(&up.received(), "AA") == ["RTD1"]).then_some(())
    });
    drop(c);
    assert_eq!(inst.stop(), Some(0));
    assert_eq!(inst.stored_control_ids(), ["RTD1"]);

    // The default, unrouted = "accept": AA, kept in the store, sent nowhere.
    let mut inst = forwarding_instance(&routes);
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    assert_code(
        &c.send(&hl7_message("LAB", "ORU^R01^ORU_R01", "UNR2")),
        "AA",
    );
    assert_code(
        &c.send(&hl7_message("EHR", "ADT^A08^ADT_A01", "RTD2")),
        "AA",
    );
    wait_for(&inst, "RTD2 delivered", 60, || {
        (ids_with(&up.received(), "AA") == ["RTD1", "RTD2"]).then_some(())
    });
    drop(c);
    assert_eq!(inst.stop(), Some(0));
    assert_eq!(inst.stored_control_ids(), ["UNR2", "RTD2"]);
    assert!(inst.log().contains("kept as unrouted"), "{}", inst.log());
}

#[test]
fn metrics_endpoint_serves_queue_figures_in_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &[]);
    let down = free_port();
    let metrics = free_port();
    let extra = format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{}{}{}{}",
        mllp_destination("hosp", up.port, ""),
        mllp_destination("offline", down, ""),
        route("all", &[], &[], &["hosp"]),
        route("orders", &["ORM^*"], &[], &["offline"]),
    );
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    for i in 0..3 {
        assert_code(
            &c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", &format!("MT{i}"))),
            "AA",
        );
    }
    assert_code(&c.send(&hl7_message("EHR", "ORM^O01", "MTO")), "AA");
    let scrape = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // Queue depths are as of the store's last commit, which follows the deliveries.
    let page = wait_for(&inst, "metrics showing 4 delivered to hosp", 60, || {
        let page = scrape();
        (page.contains("hl7edge_delivered_total{destination=\"hosp\"} 4")
            && page.contains("hl7edge_queue_depth{destination=\"hosp\"} 0"))
        .then_some(page)
    });
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("text/plain; version=0.0.4"), "{page}");
    assert!(page.contains("# TYPE hl7edge_queue_depth gauge"), "{page}");
    assert!(
        page.contains("hl7edge_queue_depth{destination=\"hosp\"} 0"),
        "{page}"
    );
    assert!(page.contains("hl7edge_messages_accepted_total 4"), "{page}");
    let page = wait_for(&inst, "metrics showing the offline queue", 60, || {
        let page = scrape();
        page.contains("hl7edge_queue_depth{destination=\"offline\"} 1")
            .then_some(page)
    });
    assert!(
        page.contains("hl7edge_destination_up{destination=\"offline\"} 0"),
        "{page}"
    );
    // No content in metrics: control IDs and patient fields never appear.
    assert!(!page.contains("MT0") && !page.contains("MRN"), "{page}");

    // A metrics address off loopback is refused at start unless explicitly allowed.
    let bad = inst.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&inst.config)
        .unwrap()
        .replace(&format!("127.0.0.1:{metrics}"), "0.0.0.0:9575");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("metrics.listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn destination_without_ca_bundle_is_verified_against_the_platform_trust_store() {
    let dir = tempfile::tempdir().unwrap();
    let upki = devpki::generate(&dir.path().join("upstream-tls"), "unused").unwrap();
    let up = Upstream::python_hl7_tls(&dir.path().join("up.log"), 0, &upki, false, &[]);
    let extra = format!(
        "\n[[destination]]\nname = \"hosp\"\nkind = \"mllps\"\naddress = \"127.0.0.1:{}\"\n\
         server_name = \"localhost\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{}",
        up.port,
        route("all", &[], &[], &["hosp"])
    );

    // The platform's roots do not hold the test CA: nothing is sent, the error says why.
    let mut inst = forwarding_instance(&extra);
    let empty = dir.path().join("empty-roots.pem");
    std::fs::write(&empty, "").unwrap();
    inst.start_with(|c| {
        c.env("SSL_CERT_FILE", &empty);
    });
    let mut c = MllpConn::connect(inst.plain_addr());
    assert_code(&c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", "PV1")), "AA");
    let st = wait_for(&inst, "a certificate error", 60, || {
        let d = inst.dest_status("hosp");
        d["live"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
            .then_some(d)
    });
    assert_eq!(st["depth"], 1, "{st}");
    assert!(up.received().is_empty());
    drop(c);
    assert_eq!(inst.stop(), Some(0));

    // The same engine with the test CA in the platform's trust store delivers.
    inst.start_with(|c| {
        c.env("SSL_CERT_FILE", &upki.ca_cert);
    });
    wait_for(&inst, "PV1 delivered", 60, || {
        (ids_with(&up.received(), "AA") == ["PV1"]).then_some(())
    });
}

/// Milliseconds since the epoch (the engine stamps dead letters with the same clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn dead_letters_are_deleted_after_dead_letter_retention_and_kept_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &["--ar", "DLR1:-1"]);
    let config = |retention: &str| {
        format!(
            "\n[store]\ndead_letter_retention = \"{retention}\"\n{}{}",
            mllp_destination("hosp", up.port, ""),
            route("all", &[], &[], &["hosp"])
        )
    };
    // DLR1 is rejected (AR) and dead-lettered at once; DLR2 is delivered and, with the default
    // retention of 7 days, stays in the store: `store list` is shown to list what is kept.
    let dead_letter_of = |inst: &Instance| -> serde_json::Value {
        let mut c = MllpConn::connect(inst.plain_addr());
        assert_code(
            &c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", "DLR1")),
            "AA",
        );
        assert_code(
            &c.send(&hl7_message("EHR", "ADT^A08^ADT_A01", "DLR2")),
            "AA",
        );
        let l = wait_for(inst, "DLR1 in dead letters", 30, || {
            inst.dead_letters("hosp").into_iter().next()
        });
        assert_eq!(l["meta"]["control_id"], "DLR1", "{l}");
        assert_eq!(l["letter"]["last_ack"], "AR", "{l}");
        l
    };

    // The long-retention instance's letter dies first, so the short retention has passed for
    // it by the time it has passed for the short-retention instance's letter.
    let mut long = forwarding_instance(&config("1h"));
    long.start();
    let long_letter = dead_letter_of(&long);
    let mut short = forwarding_instance(&config("3s"));
    short.start();
    let short_letter = dead_letter_of(&short);
    let dead_ms = short_letter["letter"]["dead_ms"].as_u64().unwrap();
    assert_eq!(short.dest_status("hosp")["dead_letters"], 1);

    // Short retention: the dead letter goes once it is 3 s old (the sweep runs every second).
    wait_for(&short, "the dead letter to be deleted", 30, || {
        short.dead_letters("hosp").is_empty().then_some(())
    });
    let purged_at = now_ms();
    assert!(
        purged_at >= dead_ms + 3000,
        "deleted {} ms after it died, before dead_letter_retention",
        purged_at - dead_ms
    );
    let d = short.dest_status("hosp");
    assert_eq!(d["dead_letters"], 0, "{d}");
    assert_eq!(d["live"]["dead_lettered"], 1, "{d}");
    assert!(
        short.log().contains("Retention deleted expired messages."),
        "{}",
        short.log()
    );

    // Long retention: the same letter, older than the short retention plus two sweeps, is
    // still there. (Nothing signals a deletion that does not happen: the margin is let pass.)
    let long_dead_ms = long_letter["letter"]["dead_ms"].as_u64().unwrap();
    assert!(long_dead_ms <= dead_ms, "{long_letter} {short_letter}");
    let clear = long_dead_ms + 3000 + 2500;
    if let Some(rest) = clear.checked_sub(now_ms()) {
        std::thread::sleep(std::time::Duration::from_millis(rest));
    }
    let kept = long.dead_letters("hosp");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0], long_letter);
    assert_eq!(long.dest_status("hosp")["dead_letters"], 1);
    assert!(!long.log().contains("Retention deleted"), "{}", long.log());

    // The deleted dead letter's message is gone from the store; the kept one's is not.
    assert_eq!(short.stop(), Some(0));
    assert_eq!(short.stored_control_ids(), ["DLR2"]);
    assert_eq!(long.stop(), Some(0));
    assert_eq!(long.stored_control_ids(), ["DLR1", "DLR2"]);
    // And both stay that way after a restart (the deletion was committed, the letter kept).
    short.start();
    assert!(short.dead_letters("hosp").is_empty());
    long.start();
    assert_eq!(long.dead_letters("hosp").len(), 1);
    assert_eq!(
        ids_with(&up.received(), "AR"),
        ["DLR1", "DLR1"],
        "sent once each"
    );
}

/// Bytes of the store file.
fn store_size(inst: &Instance) -> u64 {
    std::fs::metadata(inst.dir.path().join("state/hl7edge.redb"))
        .unwrap()
        .len()
}

#[test]
fn retention_reuses_space_under_steady_load_and_compaction_returns_it() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &[]);
    let extra = format!(
        "\n[store]\nretention = \"1ms\"\n\
         [audit]\nretention = \"1s\"\nlegal_minimum = \"1s\"\ncheckpoint_interval = \"1s\"\n{}{}",
        mllp_destination("hosp", up.port, ""),
        route("all", &[], &[], &["hosp"])
    );
    // The audit trail is under retention too here, so the file's steady state covers it.
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let filler = format!("NTE|1||{}\r", "S".repeat(4000));
    let mut c = MllpConn::connect(inst.plain_addr());
    let rounds = 10;
    let per_round = 250;
    let mut sizes = Vec::new();
    for r in 0..rounds {
        for i in 0..per_round {
            let id = format!("ST{r}-{i}");
            assert_code(
                &c.send(&(hl7_message("EHR", "ADT^A01^ADT_A01", &id) + &filler)),
                "AA",
            );
        }
        let want = (r + 1) * per_round;
        wait_for(&inst, "the round delivered and purged", 120, || {
            let st = inst.queue_json(&["status"]);
            (ids_with(&up.received(), "AA").len() == want && st["stored_bytes"] == 0).then_some(())
        });
        sizes.push(store_size(&inst));
    }
    // About 1 MB is stored and deleted per round: a file that reused no space would have grown
    // by that every round; the space freed by retention is taken again instead. The first
    // rounds may grow the file once or twice (redb grows it in steps, and an applier commit
    // holds 40 ms of records), so the steady state is measured over the last five rounds.
    eprintln!("store file size after each round: {sizes:?}");
    let round_bytes = (per_round * 4000) as u64;
    let growth = sizes[rounds - 1].saturating_sub(sizes[rounds - 6]);
    assert!(
        growth < 2 * round_bytes,
        "the store grew by {growth} bytes over 5 rounds of {round_bytes}: sizes {sizes:?}"
    );
    drop(c);
    assert_eq!(inst.stop(), Some(0));

    // Engine stopped: compaction gives the free space back to the filesystem.
    let before = store_size(&inst);
    let out = inst.cli(&["store", "compact"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = store_size(&inst);
    assert!(
        after < before / 2,
        "compaction: {before} -> {after} bytes\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The compacted store still opens and works.
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    assert_code(
        &c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", "AFTER")),
        "AA",
    );
    wait_for(&inst, "AFTER delivered", 60, || {
        ids_with(&up.received(), "AA")
            .last()
            .is_some_and(|l| l == "AFTER")
            .then_some(())
    });
}

#[test]
fn demo_shows_messages_acknowledged_forwarded_and_the_queue_drained() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["demo", "--state-dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ctrl in ["DEMO0001", "DEMO0002", "DEMO0003"] {
        assert!(
            stdout.contains(&format!("control ID {ctrl}")),
            "{ctrl} not forwarded:\n{stdout}"
        );
    }
    assert!(stdout.contains("MSA|AA|DEMO0001"), "{stdout}");
    assert!(stdout.contains("forward.delivered"), "{stdout}");
    assert!(stdout.contains("audit chain OK"), "{stdout}");
    assert!(stdout.contains("MSA|AR|DEMO0004"), "{stdout}");
    let status = stdout
        .lines()
        .find(|l| l.starts_with("hospital "))
        .unwrap_or_else(|| panic!("no status line:\n{stdout}"));
    let cols: Vec<&str> = status.split_whitespace().collect();
    // destination, depth, oldest, dead, delivered, ...
    assert_eq!(&cols[..5], ["hospital", "0", "-", "0", "3"], "{status}");
    // The store holds no plaintext of the sample messages.
    let store = std::fs::read(dir.path().join("demo/hl7edge.redb")).unwrap();
    assert!(!store.windows(7).any(|w| w == b"DOE^JAN"));
}
