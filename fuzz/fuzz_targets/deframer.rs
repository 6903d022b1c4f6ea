//! MLLP deframer: any bytes, pushed in chunks whose sizes come from the input, never panic,
//! never yield a frame above the limit, and chunking never changes the frames found.
#![no_main]

use hl7edge::hl7::mllp::{Deframer, Event};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 512;

fn run(data: &[u8], chunk: usize) -> Vec<Event> {
    let mut d = Deframer::new(MAX);
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        d.push(piece);
        while let Some(e) = d.next_event() {
            let stop = matches!(e, Event::Oversized { .. });
            out.push(e);
            if stop {
                return out;
            }
        }
        let _ = d.take_discarded();
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let chunk = data.first().map(|b| *b as usize % 17 + 1).unwrap_or(1);
    let whole = run(data, data.len());
    let pieces = run(data, chunk);
    for e in &whole {
        if let Event::Frame(p) = e {
            assert!(p.len() <= MAX);
        }
    }
    // A frame whose trailing CR arrives later is still the same frame; compare frames only
    // up to the first oversized event, where both stop.
    let frames = |v: &[Event]| -> Vec<Vec<u8>> {
        v.iter()
            .take_while(|e| matches!(e, Event::Frame(_)))
            .filter_map(|e| match e {
                Event::Frame(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(frames(&whole), frames(&pieces));
});
