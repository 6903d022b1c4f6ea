//! The audit trail, end to end with the real binary: a message's life in order with the seed's
//! metadata, export by MRN token and control ID, every kind of tampering caught by
//! `audit verify` at its sequence number, and the alert rules firing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::path::Path;

use common::*;
use hl7edge::audit::{chain_hash, split_stored, Record, AUDIT, CHECKPOINTS};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

/// `hl7edge audit export <args>`, parsed as JSON lines.
fn export(inst: &Instance, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "export"];
    all.extend_from_slice(args);
    let out = inst.cli(&all);
    assert!(
        out.status.success(),
        "audit export {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_message_life_is_audited_in_order_and_found_by_mrn_token_and_control_id() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &[]);
    let extra = format!(
        "{}{}",
        mllp_destination("hosp", up.port, ""),
        route("all", &[], &[], &["hosp"])
    );
    let mut inst = forwarding_instance(&extra);
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    for id in ["LIFE1", "OTHER1"] {
        let ack = c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", id));
        assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
    }
    wait_for(&inst, "both delivered", 30, || {
        (ids_with(&up.received(), "AA").len() == 2).then_some(())
    });

    // By patient: the MRN is turned into its token, and the forwarding records follow.
    let life = wait_for(&inst, "the delivery in the audit", 30, || {
        let r = export(&inst, &["--mrn", "MRNLIFE1"]);
        events(&r)
            .contains(&"forward.delivered".to_string())
            .then_some(r)
    });
    assert_eq!(events(&life), ["message.received", "forward.delivered"]);
    let (rx, fwd) = (&life[0], &life[1]);
    assert_eq!(rx["control_id"], "LIFE1");
    assert_eq!(rx["listener"], "legacy");
    assert_eq!(rx["message_type"], "ADT^A01^ADT_A01");
    assert_eq!(rx["detail"]["sending_application"], "EHR");
    assert_eq!(rx["detail"]["sending_facility"], "NORTHCLINIC");
    assert_eq!(rx["detail"]["receiving_application"], "HL7EDGE");
    assert_eq!(rx["detail"]["receiving_facility"], "HOSP");
    assert_eq!(rx["detail"]["destinations"], "hosp");
    assert_eq!(rx["outcome"], "stored");
    assert_eq!(rx["detail"]["ack"], "AA", "the ACK code sent");
    assert!(rx["actor"].as_str().unwrap().starts_with("127.0.0.1:"));
    let token = rx["mrn_token"].as_str().unwrap();
    assert!(token.starts_with("t1:"), "{token}");
    assert!(
        rx.get("mrn_sealed").is_none(),
        "export carries the token only"
    );
    assert_eq!(fwd["destination"], "hosp");
    assert_eq!(fwd["message_id"], rx["message_id"]);
    assert!(fwd["seq"].as_u64() > rx["seq"].as_u64());
    assert!(rx["time_ms"].as_u64() <= fwd["time_ms"].as_u64());
    let all = serde_json::to_string(&life).unwrap();
    assert!(!all.contains("MRNLIFE1") && !all.contains("DOE"), "{all}");

    // The MRN may come on stdin, out of the process list.
    let mut child = std::process::Command::new(BIN)
        .args(["audit", "export", "--mrn", "-", "--config"])
        .arg(&inst.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"MRNLIFE1\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("command line"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Through the control socket a command records only its own operator event, under the
    // socket's real user.
    let ask = |line: &str| {
        let mut s =
            std::os::unix::net::UnixStream::connect(inst.dir.path().join("state/control.sock"))
                .unwrap();
        std::io::Write::write_all(&mut s, format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut answer).unwrap();
        answer
    };
    let forged =
        ask(r#"{"cmd":"auditrecord","time_ms":1,"event":"alert.failed_auth","severity":"alert"}"#);
    assert!(forged.contains("only admin.* events"), "{forged}");
    let own = ask(r#"{"cmd":"auditrecord","time_ms":1,"event":"admin.note","actor":"uid:4242"}"#);
    assert!(own.contains("recorded"), "{own}");
    let note = wait_for(&inst, "the admin.note record", 30, || {
        export(&inst, &["--event", "admin.note"]).pop()
    });
    let me = format!("uid:{}", nix::unistd::getuid().as_raw());
    assert_eq!(
        note["actor"],
        me.as_str(),
        "the actor is who is on the socket"
    );

    // By control ID: the same life; the other patient's message is in neither.
    let by_ctrl = export(&inst, &["--control-id", "LIFE1"]);
    assert_eq!(events(&by_ctrl), events(&life));
    let other = export(&inst, &["--mrn", "MRNOTHER1"]);
    assert_eq!(other[0]["control_id"], "OTHER1");
    assert_ne!(other[0]["mrn_token"], rx["mrn_token"]);

    // The search table for incident response.
    let out = inst.cli(&["audit", "search", "--mrn", "MRNLIFE1"]);
    let table = String::from_utf8_lossy(&out.stdout);
    // An MRN on the command line works, with a pointer to the safer stdin.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`--mrn -` reads it from stdin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("message.received") && table.contains("forward.delivered"));
    assert!(
        table.contains("LIFE1") && !table.contains("OTHER1"),
        "{table}"
    );

    // The chain verifies while the engine runs, and after a clean stop, fully signed.
    let out = inst.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(c);
    assert_eq!(inst.stop(), Some(0));
    let out = inst.cli(&["audit", "verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["unsigned_tail"], 0, "{report}");
    assert!(report["checkpoints_verified"].as_u64().unwrap() >= 1);
    // The exports and searches above are themselves audited, with who and how many.
    let exports = export(&inst, &["--event", "admin.audit_export"]);
    assert!(exports.len() >= 3);
    assert!(exports[0]["actor"].as_str().unwrap().starts_with("uid:"));
    let generated = export(&inst, &["--event", "security.key_generated"]);
    let keys: Vec<&str> = generated
        .iter()
        .map(|g| g["detail"]["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["message", "audit"],
        "keys generated on the first start"
    );
    let started = export(&inst, &["--event", "engine."]);
    assert_eq!(events(&started)[..2], ["engine.started", "engine.stopped"]);
}

/// Runs `audit verify` on the store as it is; returns (exit code, output).
fn verify(inst: &Instance) -> (Option<i32>, String) {
    let out = inst.cli(&["audit", "verify"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn with_db(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    f(&tx);
    tx.commit().unwrap();
}

fn record(tx: &redb::WriteTransaction, seq: u64) -> Vec<u8> {
    let t = tx.open_table(AUDIT).unwrap();
    let v = t.get(seq).unwrap().unwrap().value().to_vec();
    v
}

#[test]
fn every_tampering_is_caught_by_audit_verify_at_its_sequence_number() {
    let mut inst = Instance::new("", "");
    // Small checkpoints so the chain has several.
    let text = std::fs::read_to_string(&inst.config).unwrap()
        + "\n[audit]\ncheckpoint_every = 5\ncheckpoint_interval = \"1s\"\n";
    std::fs::write(&inst.config, text).unwrap();
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    // Three rounds, each signed by a checkpoint (they are signed in durable commits, every
    // 100 ms) before the next.
    for round in 0..3u64 {
        for i in 0..10 {
            let ack = c.send(&hl7_message(
                "EHR",
                "ADT^A01^ADT_A01",
                &format!("TAMPER{round}-{i}"),
            ));
            assert_eq!(ack_code(&ack).as_deref(), Some("AA"));
        }
        wait_for(&inst, "a checkpoint over the round", 30, || {
            let out = inst.cli(&["audit", "verify", "--json"]);
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (r["checkpoints_verified"].as_u64()? > round).then_some(())
        });
    }
    drop(c);
    assert_eq!(inst.stop(), Some(0));
    let store = inst.dir.path().join("state/hl7edge.redb");
    let pristine = inst.dir.path().join("pristine.redb");
    std::fs::copy(&store, &pristine).unwrap();
    let (last, checkpoints) = {
        let db = redb::Database::open(&store).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(AUDIT).unwrap();
        let last = t.last().unwrap().unwrap().0.value();
        let cps: Vec<u64> = tx
            .open_table(CHECKPOINTS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        assert!(t.len().unwrap() >= 30);
        (last, cps)
    };
    assert!(checkpoints.len() >= 3, "{checkpoints:?}");
    let restore = || std::fs::copy(&pristine, &store).unwrap();

    // Untouched: intact.
    let (code, out) = verify(&inst);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit chain OK"), "{out}");
    // (Each verification audits itself: back to the pristine copy before every case.)
    restore();

    let expect_broken = |seq: u64, what: &str| {
        let (code, out) = verify(&inst);
        assert_eq!(code, Some(65), "{what}: {out}");
        assert!(
            out.contains(&format!("BROKEN at sequence {seq}:")),
            "{what}: expected sequence {seq}: {out}"
        );
        restore();
    };

    // One byte of one record's content.
    with_db(&store, |tx| {
        let mut v = record(tx, 7);
        let at = v.len() - 5;
        v[at] ^= 0x01;
        tx.open_table(AUDIT)
            .unwrap()
            .insert(7, v.as_slice())
            .unwrap();
    });
    expect_broken(7, "modified");

    // One record deleted.
    with_db(&store, |tx| {
        tx.open_table(AUDIT).unwrap().remove(9).unwrap();
    });
    expect_broken(9, "deleted");

    // One record inserted at 12, chained to record 11 as a careful forger would: the chain
    // holds up to it, and breaks at 13, which now holds record 12.
    with_db(&store, |tx| {
        let mut t = tx.open_table(AUDIT).unwrap();
        for seq in (12..=last).rev() {
            let v = t.get(seq).unwrap().unwrap().value().to_vec();
            t.insert(seq + 1, v.as_slice()).unwrap();
        }
        let prev = split_stored(t.get(11).unwrap().unwrap().value()).unwrap().0;
        let eleven = t.get(11).unwrap().unwrap().value().to_vec();
        let mut r: Record = serde_json::from_slice(split_stored(&eleven).unwrap().1).unwrap();
        r.seq = 12;
        r.event.event = "admin.forged".into();
        let c = r.canonical();
        let mut forged = chain_hash(&prev, &c).to_vec();
        forged.extend_from_slice(&c);
        t.insert(12, forged.as_slice()).unwrap();
    });
    expect_broken(13, "inserted and chained");

    // One record inserted at 12: the rest moved up by one.
    with_db(&store, |tx| {
        let mut t = tx.open_table(AUDIT).unwrap();
        for seq in (12..=last).rev() {
            let v = t.get(seq).unwrap().unwrap().value().to_vec();
            t.insert(seq + 1, v.as_slice()).unwrap();
        }
        let mut forged = t.get(11).unwrap().unwrap().value().to_vec();
        let (_, canonical) = split_stored(&forged).unwrap();
        let mut r: Record = serde_json::from_slice(canonical).unwrap();
        r.seq = 12;
        r.event.event = "admin.forged".into();
        let c = r.canonical();
        forged = chain_hash(&[0; 32], &c).to_vec();
        forged.extend_from_slice(&c);
        t.insert(12, forged.as_slice()).unwrap();
    });
    expect_broken(12, "inserted");

    // Two records swapped.
    with_db(&store, |tx| {
        let (a, b) = (record(tx, 3), record(tx, 4));
        let mut t = tx.open_table(AUDIT).unwrap();
        t.insert(3, b.as_slice()).unwrap();
        t.insert(4, a.as_slice()).unwrap();
    });
    expect_broken(3, "swapped");

    // The tail truncated below the newest checkpoint.
    let newest = *checkpoints.last().unwrap();
    let cut = newest - 2;
    with_db(&store, |tx| {
        let mut t = tx.open_table(AUDIT).unwrap();
        for seq in cut..=last {
            t.remove(seq).unwrap();
        }
    });
    expect_broken(cut, "truncated");

    // Record 5 edited and every later hash recomputed (a careful forger without the key):
    // the first signed checkpoint past it no longer matches.
    let first_cp_after = *checkpoints.iter().find(|c| **c >= 5).unwrap();
    with_db(&store, |tx| {
        let mut t = tx.open_table(AUDIT).unwrap();
        let mut prev = split_stored(t.get(4).unwrap().unwrap().value()).unwrap().0;
        for seq in 5..=last {
            let v = t.get(seq).unwrap().unwrap().value().to_vec();
            let mut r: Record = serde_json::from_slice(split_stored(&v).unwrap().1).unwrap();
            if seq == 5 {
                r.event.outcome = Some("forged".into());
            }
            let c = r.canonical();
            let h = chain_hash(&prev, &c);
            let mut nv = h.to_vec();
            nv.extend_from_slice(&c);
            t.insert(seq, nv.as_slice()).unwrap();
            prev = h;
        }
    });
    expect_broken(first_cp_after, "rewritten with recomputed hashes");

    // An auditor without the TPM verifies with the public key alone; a wrong key fails.
    let out = inst.cli(&["audit", "public-key"]);
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = inst.cli(&["audit", "verify", "--public-key", &key]);
    assert_eq!(out.status.code(), Some(0));
    use base64::Engine as _;
    let other = base64::engine::general_purpose::STANDARD.encode(
        ed25519_dalek::SigningKey::from_bytes(&[5; 32])
            .verifying_key()
            .as_bytes(),
    );
    let out = inst.cli(&["audit", "verify", "--public-key", &other]);
    assert_eq!(out.status.code(), Some(65), "a foreign key must not verify");
}

#[test]
fn alert_rules_fire_into_the_audit_trail_and_the_metrics() {
    use std::net::TcpStream;
    let now_h = (hl7edge::store::now_ms() / 3_600_000) % 24;
    // A window around now, and one that excludes now.
    let around = "00:00-24:00".to_string();
    let elsewhere = format!("{:02}:00-{:02}:00", (now_h + 3) % 24, (now_h + 4) % 24);
    let metrics_port = free_port();
    let alerts = |admin: &str, change: &str| {
        format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [alerts]\nfailed_auth = {{ threshold = 3, window = \"10m\" }}\n\
             bulk = {{ threshold = 5, window = \"10m\" }}\nadmin_hours = \"{admin}\"\n\
             change_window = \"{change}\"\nqueue_depth = 2\nstore_quota_percent = 1\n\
             cert_expiry = \"3000000days\"\n\
             [store]\nquota = \"64KiB\"\n{}{}",
            mllp_destination("down", free_port(), "connect_timeout = \"1s\""),
            route("all", &[], &[], &["down"])
        )
    };
    let mut inst = forwarding_instance(&alerts(&around, &around));
    inst.start();
    // Read with `audit search`, which (unlike export) does not count as bulk access.
    let search = |inst: &Instance, event: &str| -> usize {
        let out = inst.cli(&["audit", "search", "--event", event]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).lines().count() - 1
    };
    let fired = |inst: &Instance, rule: &str| search(inst, &format!("alert.{rule}"));

    // Failed authentications: two TLS clients without a certificate are below the threshold,
    // the third reaches it.
    let no_cert = |inst: &Instance| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("127.0.0.1:{}", inst.mllps_port))
            .arg("-CAfile")
            .arg(&inst.pki.ca_cert)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        drop(out);
    };
    no_cert(&inst);
    no_cert(&inst);
    wait_for(&inst, "two failed authentications audited", 30, || {
        (search(&inst, "auth.failed") == 2).then_some(())
    });
    assert_eq!(fired(&inst, "failed_auth"), 0, "two is below the threshold");
    no_cert(&inst);
    wait_for(&inst, "the failed_auth alert", 30, || {
        (fired(&inst, "failed_auth") == 1).then_some(())
    });

    // Queue depth above 2 and the store above 1 % of its quota (the destination is down).
    let mut c = MllpConn::connect(inst.plain_addr());
    for i in 0..3 {
        assert_eq!(
            ack_code(&c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", &format!("DEPTH{i}"))))
                .as_deref(),
            Some("AA")
        );
    }
    wait_for(&inst, "the queue_depth and store_quota alerts", 30, || {
        (fired(&inst, "queue_depth") == 1 && fired(&inst, "store_quota") == 1).then_some(())
    });
    // Certificates within the (huge) expiry horizon; administrative access within hours and
    // the first configuration inside its change window: no alert for those.
    assert_eq!(
        fired(&inst, "cert_expiry"),
        2,
        "listener certificate and client CA"
    );
    inst.queue_json(&["status"]);
    // An alert is chained in the same commit as the record that raised it.
    wait_for(&inst, "the status command audited", 30, || {
        (search(&inst, "admin.queue_status") >= 1).then_some(())
    });
    assert_eq!(fired(&inst, "after_hours_admin"), 0);
    assert_eq!(fired(&inst, "config_change_outside_window"), 0);

    // Bulk: an empty export counts nothing; a full one passes the threshold of 5.
    assert!(export(&inst, &["--control-id", "NOSUCH"]).is_empty());
    wait_for(&inst, "the empty export audited", 30, || {
        (search(&inst, "admin.audit_export") >= 1).then_some(())
    });
    assert_eq!(fired(&inst, "bulk"), 0);
    assert!(export(&inst, &[]).len() >= 5);
    wait_for(&inst, "the bulk alert", 30, || {
        (fired(&inst, "bulk") >= 1).then_some(())
    });

    // The metrics count what fired.
    let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    std::io::Read::read_to_string(&mut s, &mut page).unwrap();
    assert!(
        page.contains("hl7edge_alerts_total{rule=\"failed_auth\"} 1"),
        "{page}"
    );
    drop(c);
    assert_eq!(inst.stop(), Some(0));

    // A configuration change outside its window, and administrative access outside hours.
    let text = std::fs::read_to_string(&inst.config).unwrap();
    let base = text.split("\n[metrics]").next().unwrap().to_string();
    std::fs::write(&inst.config, base + &alerts(&elsewhere, &elsewhere)).unwrap();
    inst.start();
    wait_for(&inst, "the change-window alert", 30, || {
        (fired(&inst, "config_change_outside_window") == 1).then_some(())
    });
    let changed = export(&inst, &["--event", "config.changed"]);
    assert_eq!(changed.len(), 2, "first start, then the change");
    assert_ne!(
        changed[1]["detail"]["old_hash"],
        changed[1]["detail"]["new_hash"]
    );
    inst.queue_json(&["status"]);
    // (The searches above are administrative access too, and alert as well; the status
    // command's alert reaches the chain with the applier's next commit.)
    let alert = wait_for(
        &inst,
        "the after-hours alert of the status command",
        30,
        || {
            export(&inst, &["--event", "alert.after_hours_admin"])
                .into_iter()
                .find(|a| a["detail"]["access"] == "admin.queue_status")
        },
    );
    assert_eq!(alert["severity"], "alert");
    assert!(alert["detail"]["by"].as_str().unwrap().starts_with("uid:"));
    assert_eq!(inst.stop(), Some(0));
}

#[test]
fn retention_purges_the_audit_trail_from_a_checkpoint_and_what_remains_verifies() {
    let mut inst = Instance::new("", "");
    let base = std::fs::read_to_string(&inst.config).unwrap();
    // Below the legal minimum: refused, naming file and key.
    std::fs::write(
        &inst.config,
        base.clone() + "\n[audit]\nretention = \"1y\"\nlegal_minimum = \"6y\"\n",
    )
    .unwrap();
    let out = inst.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hl7edge.toml") && err.contains("audit.retention"),
        "{err}"
    );

    std::fs::write(
        &inst.config,
        base + "\n[audit]\nretention = \"1s\"\nlegal_minimum = \"1s\"\n\
                checkpoint_every = 3\ncheckpoint_interval = \"1s\"\n",
    )
    .unwrap();
    inst.start();
    let mut c = MllpConn::connect(inst.plain_addr());
    for i in 0..10 {
        let ack = c.send(&hl7_message("EHR", "ADT^A01^ADT_A01", &format!("RET{i}")));
        assert_eq!(ack_code(&ack).as_deref(), Some("AA"));
    }
    // Records older than a second go, up to a checkpoint signed before the cutoff.
    let purged = wait_for(&inst, "an audit.purged record", 30, || {
        let p = export(&inst, &["--event", "audit.purged"]);
        (!p.is_empty()).then_some(p)
    });
    let through: u64 = purged[0]["detail"]["through_seq"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(through >= 3, "{purged:?}");
    let first = export(&inst, &[]);
    assert!(
        first[0]["seq"].as_u64().unwrap() > through,
        "records through {through} are gone: {:?}",
        first[0]
    );
    // What remains verifies from the anchor checkpoint, running and stopped.
    let out = inst.cli(&["audit", "verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report["first_seq"].as_u64().unwrap() > 1, "{report}");
    drop(c);
    assert_eq!(inst.stop(), Some(0));
    let out = inst.cli(&["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn security_records_of_one_peer_are_folded_beyond_a_burst() {
    use std::io::{Read, Write};
    let mut inst = Instance::new("", "");
    inst.start();
    // 25 failed TLS handshakes from one address within the minute.
    for _ in 0..25 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", inst.mllps_port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(b"not a client hello\r\n\r\n").unwrap();
        // The engine records the failure, then closes: EOF (or a reset) here.
        let _ = s.read(&mut [0u8; 256]);
    }
    // An operator command travels the same channel: once it is in the trail, so is every
    // record sent before it.
    inst.queue_json(&["status"]);
    wait_for(&inst, "the operator command in the trail", 30, || {
        (!export(&inst, &["--event", "admin.queue_status"]).is_empty()).then_some(())
    });
    let failed = export(&inst, &["--event", "auth.failed"]);
    assert_eq!(failed.len(), 20, "the first 20 one by one, the rest folded");
    assert!(failed
        .iter()
        .all(|f| f["actor"].as_str().unwrap().starts_with("127.0.0.1:")));
    assert_eq!(inst.stop(), Some(0));
}
