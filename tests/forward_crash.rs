//! Promise 2 under kill -9: with a python-hl7 upstream running and several senders, the engine
//! is killed mid-stream and restarted. Every message that got AA reaches the upstream at least
//! once, and each sender's messages arrive in the order that sender had them acknowledged
//! (first occurrences: a message sent again after the crash may repeat).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const SENDERS: usize = 6;

#[test]
fn kill_9_mid_stream_then_restart_delivers_every_acknowledged_message_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::python_hl7(&dir.path().join("up.log"), 0, &[]);
    let extra = mllp_destination("hosp", up.port, "") + &route("all", &[], &[], &["hosp"]);
    let mut inst = forwarding_instance(&extra);
    inst.start();

    let acked: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); SENDERS]));
    let count = Arc::new(AtomicUsize::new(0));
    let addr = inst.plain_addr();
    let types = [
        "ADT^A01^ADT_A01",
        "ORU^R01^ORU_R01",
        "ADT^A08^ADT_A01",
        "ORM^O01^ORM_O01",
    ];
    let mut senders = Vec::new();
    for t in 0..SENDERS {
        let acked = Arc::clone(&acked);
        let count = Arc::clone(&count);
        senders.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            for i in 0..100_000 {
                let id = format!("S{t}N{i:06}");
                let msg = hl7_message(&format!("APP{t}"), types[i % types.len()], &id);
                if s.write_all(&frame(msg.as_bytes())).is_err() {
                    return;
                }
                match read_frame(&mut s) {
                    Some(ack)
                        if ack_code(&String::from_utf8_lossy(&ack)).as_deref() == Some("AA") =>
                    {
                        acked.lock().unwrap()[t].push(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    // Kill once many messages are acknowledged, some delivered and many still queued.
    wait_for(&inst, "1200 AA and some deliveries", 60, || {
        (count.load(Ordering::SeqCst) >= 1200 && !up.received().is_empty()).then_some(())
    });
    inst.kill9();
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total >= 1200);

    // With the engine dead (its control socket file left behind), `queue status` reads the
    // store itself.
    let out = inst.cli(&["queue", "status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("engine: stopped"), "{table}");
    assert_eq!(inst.queue_json(&["status"])["engine_running"], false);

    inst.start();
    wait_for(&inst, "the queue drained after restart", 120, || {
        (inst.dest_status("hosp")["depth"] == 0).then_some(())
    });
    let log = up.received();
    assert!(log.iter().all(|r| r.code == "AA"));
    let order = first_occurrences(&log);
    let pos: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    for (t, ids) in acked.iter().enumerate() {
        let missing: Vec<&String> = ids
            .iter()
            .filter(|c| !pos.contains_key(c.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "sender {t}: {} acknowledged messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let positions: Vec<usize> = ids.iter().map(|c| pos[c.as_str()]).collect();
        if let Some(w) = positions.windows(2).position(|w| w[0] >= w[1]) {
            panic!(
                "sender {t}: {} arrived before {} although it was acknowledged after it",
                ids[w + 1],
                ids[w]
            );
        }
    }
    // The restarted engine goes on forwarding new messages.
    let ack = send_plain(
        inst.plain_addr(),
        &hl7_message("EHR", "ADT^A01^ADT_A01", "AFTERKILL"),
    )
    .unwrap();
    assert_eq!(ack_code(&ack).as_deref(), Some("AA"), "{ack}");
    wait_for(&inst, "AFTERKILL delivered", 60, || {
        up.received()
            .iter()
            .any(|r| r.control_id == "AFTERKILL")
            .then_some(())
    });
    eprintln!(
        "{total} acknowledged before kill -9; upstream received {} ({} distinct)",
        log.len(),
        order.len()
    );
}
