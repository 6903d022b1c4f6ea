//! HL7 parser and ACK builder: any bytes never panic; every ACK built from a parsed message
//! parses again.
#![no_main]

use hl7edge::hl7::{
    build_ack, nak_for_unparsed, AckParams, ErrCondition, FieldPath, Message, Outcome, Severity,
};
use libfuzzer_sys::fuzz_target;

const PATHS: &[&str] = &["MSH-9.2", "PID-3[2].1", "PID-5.1", "OBX[2]-5", "PID-3[1].4.1", "ZZZ-99"];

fuzz_target!(|data: &[u8]| {
    let params = AckParams {
        timestamp: "20260101000000",
        control_id: "FUZZ1",
    };
    match Message::parse(data) {
        Ok(msg) => {
            for p in PATHS {
                if let Ok(path) = p.parse::<FieldPath>() {
                    let _ = msg.get(&path);
                    let _ = msg.text(&path);
                }
            }
            let _ = msg.mrns();
            let err = ErrCondition::new(207, Severity::Error, "fuzz");
            for outcome in [Outcome::Accepted, Outcome::Error(err.clone()), Outcome::Rejected(err)] {
                if let Some(ack) = build_ack(&msg, &outcome, &params) {
                    assert!(Message::parse(&ack).is_ok(), "an ACK we built does not parse");
                }
            }
        }
        Err(e) => {
            let _ = nak_for_unparsed(data, &e, &params);
        }
    }
});
