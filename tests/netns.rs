//! Promise 4 with real interfaces: a listener bound to one interface (SO_BINDTODEVICE) refuses
//! connections that arrive on another, even to the same wildcard address. Two veth pairs join
//! the root namespace to a client namespace the test creates and deletes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail by panicking.

mod common;

use std::process::Command;

use common::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Netns {
    name: String,
    links: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Sends a framed message from inside the namespace with socat; returns what came back.
fn send_from_ns(ns: &str, addr: &str, msg: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "socat",
            "-t3",
            "-T5",
            "-",
            &format!("TCP:{addr},connect-timeout=5"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&frame(msg.as_bytes()))?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn listener_bound_to_an_interface_refuses_other_interfaces() {
    let tag = std::process::id() % 10000;
    let ns = Netns {
        name: format!("hl7e-c{tag}"),
        links: vec![format!("hea{tag}"), format!("heb{tag}")],
    };
    let (a, b) = (&ns.links[0], &ns.links[1]);
    ip(&["netns", "add", &ns.name]);
    ip(&[
        "link", "add", a, "type", "veth", "peer", "name", "pa", "netns", &ns.name,
    ]);
    ip(&[
        "link", "add", b, "type", "veth", "peer", "name", "pb", "netns", &ns.name,
    ]);
    ip(&["addr", "add", "10.231.1.1/24", "dev", a]);
    ip(&["addr", "add", "10.231.2.1/24", "dev", b]);
    ip(&["link", "set", a, "up"]);
    ip(&["link", "set", b, "up"]);
    ip(&["-n", &ns.name, "addr", "add", "10.231.1.2/24", "dev", "pa"]);
    ip(&["-n", &ns.name, "addr", "add", "10.231.2.2/24", "dev", "pb"]);
    ip(&["-n", &ns.name, "link", "set", "pa", "up"]);
    ip(&["-n", &ns.name, "link", "set", "pb", "up"]);
    ip(&["-n", &ns.name, "link", "set", "lo", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("tls"), "t").unwrap();
    let (p1, p2) = (free_port(), free_port());
    let text = config_text(dir.path(), &pki, p1, p2, "", "")
        .replace(
            &format!("address = \"127.0.0.1:{p2}\""),
            &format!("address = \"0.0.0.0:{p2}\"\ninterface = \"{a}\""),
        )
        .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"10.231.0.0/16\"]");
    let mut inst = Instance::with_config(dir, pki, p1, p2, &text);
    inst.start();

    let ok = send_from_ns(&ns.name, &format!("10.231.1.1:{p2}"), &adt("VIA_A", "X"));
    assert!(
        ok.contains("MSA|AA|VIA_A"),
        "bound interface must accept: {ok:?}\n{}",
        inst.log()
    );
    // Same wildcard listener, reached through the other interface: refused.
    let refused = send_from_ns(&ns.name, &format!("10.231.2.1:{p2}"), &adt("VIA_B", "X"));
    assert!(
        !refused.contains("MSA|"),
        "other interface must be refused: {refused:?}"
    );
    assert_eq!(inst.stop(), Some(0));
    let ids = inst.stored_control_ids();
    assert!(ids.contains(&"VIA_A".to_string()) && !ids.contains(&"VIA_B".to_string()));
}
