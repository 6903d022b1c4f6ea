//! Replays the fuzz seed corpus through the deframer and the parser as an ordinary test, so the
//! fuzz targets' properties are checked even where cargo-fuzz is not installed.
#![allow(clippy::unwrap_used)]

use hl7edge::hl7::mllp::{Deframer, Event};
use hl7edge::hl7::{build_ack, nak_for_unparsed, AckParams, Message, Outcome};

#[test]
fn seed_corpus_never_panics_and_acks_reparse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds");
    let params = AckParams {
        timestamp: "20260101000000",
        control_id: "REPLAY1",
    };
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        n += 1;
        for cut in 0..=data.len() {
            let input = &data[..cut];
            let mut d = Deframer::new(256);
            d.push(input);
            while let Some(e) = d.next_event() {
                if let Event::Frame(p) = e {
                    assert!(p.len() <= 256);
                }
            }
            match Message::parse(input) {
                Ok(m) => {
                    if let Some(ack) = build_ack(&m, &Outcome::Accepted, &params) {
                        assert!(Message::parse(&ack).is_ok());
                    }
                }
                Err(e) => {
                    let _ = nak_for_unparsed(input, &e, &params);
                }
            }
        }
    }
    assert!(n >= 3, "seed corpus missing");
}
