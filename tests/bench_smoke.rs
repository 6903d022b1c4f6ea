//! `hl7edge bench` stays runnable: a small run of every scenario completes, every message gets
//! AA, and each figure the README quotes is printed. No figure is checked: speed is measured by
//! the bench, never asserted in a test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_hl7edge");

#[test]
fn a_small_bench_run_completes_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["bench", "--messages", "400", "--connections", "8"])
        .args(["--backlog", "800", "--rate", "400", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "disk, growing file",
        "disk, preallocated file",
        "1 connection, plain MLLP, sequential",
        "1 connection, MLLPS, sequential",
        "sequential vs disk fsync rate",
        "8 connections, plain MLLP",
        "8 connections, MLLPS mTLS",
        "400 msg/s offered",
        "relay: end to end",
        "backlog: 800 queued",
        "engine RSS with the backlog queued",
        "restart with the backlog until ready",
        "drain of the backlog",
        "engine RSS after the drain",
    ] {
        assert!(stdout.contains(row), "no '{row}' row:\n{stdout}\n{stderr}");
    }
    // Every scenario's messages were acknowledged with AA, and the drain delivered them all.
    for line in stdout.lines().filter(|l| l.contains("not AA")) {
        assert!(line.contains(", 0 not AA)"), "{line}");
    }
    assert!(!stdout.contains("delivered in time"), "{stdout}");
    assert!(!stdout.contains("not all delivered"), "{stdout}");
}
