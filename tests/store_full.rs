//! Promise 1 when the disk fills: messages that cannot be stored get AE (never AA), everything
//! that got AA is in the store, and once space is back the same engine answers AA again.
//! The state folder is a small tmpfs the test mounts and unmounts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &std::path::Path, size: &str, remount: bool) {
    let opts = if remount {
        format!("remount,size={size}")
    } else {
        format!("size={size},mode=0700")
    };
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs {opts}");
}

#[test]
fn full_disk_gets_ae_never_aa_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("tls"), "t").unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    mount_tmpfs(&state, "3m", false);
    let _mount = Mount(state.clone());
    let (a, b) = (free_port(), free_port());
    let text = config_text(dir.path(), &pki, a, b, "", "");
    let mut inst = Instance::with_config(dir, pki, a, b, &text);
    inst.start();

    let mut s = TcpStream::connect(inst.plain_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let filler = format!("NTE|1||{}\r", "F".repeat(60_000));
    let mut acked = Vec::new();
    let mut ae = 0;
    for i in 0..200 {
        let id = format!("FULL{i}");
        let msg = adt(&id, "X") + &filler;
        std::io::Write::write_all(&mut s, &frame(msg.as_bytes())).unwrap();
        let ack = String::from_utf8_lossy(&read_frame(&mut s).expect("an answer, even when full"))
            .into_owned();
        match ack_code(&ack).as_deref() {
            Some("AA") => acked.push(id),
            Some("AE") => {
                ae += 1;
                if ae >= 3 {
                    break;
                }
            }
            other => panic!("unexpected {other:?}: {ack}"),
        }
    }
    assert!(ae >= 3, "the disk never filled ({} AA)", acked.len());
    assert!(!acked.is_empty());

    // Space comes back: the same engine, the same connection, answers AA again.
    mount_tmpfs(&state, "64m", true);
    std::io::Write::write_all(&mut s, &frame(adt("AFTERFULL", "X").as_bytes())).unwrap();
    let ack = String::from_utf8_lossy(&read_frame(&mut s).unwrap()).into_owned();
    assert_eq!(
        ack_code(&ack).as_deref(),
        Some("AA"),
        "{ack}\n{}",
        inst.log()
    );
    drop(s);
    assert_eq!(inst.stop(), Some(0));
    let stored = inst.stored_control_ids();
    for id in &acked {
        assert!(
            stored.contains(id),
            "{id} got AA but is not stored\n{}",
            inst.log()
        );
    }
    assert!(stored.contains(&"AFTERFULL".to_string()));
}
