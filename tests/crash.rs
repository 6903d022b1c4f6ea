//! Promise 1 under kill -9: every message that got AA before the engine was killed is in the
//! store after restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let mut inst = Instance::new("", "");
    inst.start();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let addr = inst.plain_addr();
    let mut senders = Vec::new();
    for t in 0..16 {
        let acked = Arc::clone(&acked);
        let count = Arc::clone(&count);
        senders.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            for i in 0..100_000 {
                let id = format!("K{t}N{i}");
                if s.write_all(&frame(adt(&id, "CRASH").as_bytes())).is_err() {
                    return;
                }
                match read_frame(&mut s) {
                    Some(ack)
                        if ack_code(&String::from_utf8_lossy(&ack)).as_deref() == Some("AA") =>
                    {
                        acked.lock().unwrap().insert(id);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    // Kill once a good number of messages are acknowledged and many more are in flight.
    while count.load(Ordering::SeqCst) < 1500 {
        std::thread::yield_now();
    }
    inst.kill9();
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 1500);

    // Restart on the same store: it opens after the crash and takes new messages.
    inst.start();
    assert_eq!(
        ack_code(&send_plain(inst.plain_addr(), &adt("AFTERCRASH", "X")).unwrap()).as_deref(),
        Some("AA")
    );
    assert_eq!(inst.stop(), Some(0));
    let stored: HashSet<String> = inst.stored_control_ids().into_iter().collect();
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing after kill -9: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(stored.contains("AFTERCRASH"));
}
