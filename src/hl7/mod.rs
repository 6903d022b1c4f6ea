//! # HL7 v2, sans IO
//!
//! This module turns the bytes of one HL7 v2 message (already deframed by [`mllp`]) into a
//! [`Message`] the engine can route, audit and acknowledge, and builds the acknowledgements
//! (ACK/NAK) it sends back. It does no I/O and knows nothing of sockets, tokio or storage.
//!
//! ## Model
//!
//! A [`Message`] owns the received bytes and an index of segment ranges over them. Delimiters come
//! from MSH-1 (field separator, the byte after `MSH`) and MSH-2 (component, repetition, escape,
//! subcomponent and, from v2.7, an optional truncation character, e.g. `^~\&#`). Segments end at
//! CR, LF or CRLF; a UTF-8 BOM, leading whitespace and blank lines are skipped. Fields,
//! repetitions, components and subcomponents are split lazily when a [`FieldPath`] such as
//! `PID-3[2].4.1` or `OBX[2]-5` is looked up, so parsing costs one pass over the bytes plus the
//! header fields ([`Header`]), with one allocation for the index. MSH numbering follows the
//! standard: MSH-1 is the field separator itself, MSH-2 the encoding characters (both returned
//! literally), MSH-3 the first field after them.
//!
//! [`Message::get`] returns raw, still-escaped bytes; [`Message::text`] unescapes (see
//! [`escape`]) and decodes with the MSH-18 character set (see [`charset`]).
//!
//! ## Invariants
//!
//! - **Raw bytes are never re-encoded.** [`Message::raw`] returns exactly what was received, BOM
//!   and terminators included; what is stored and forwarded is those bytes. Text views are
//!   copies. ACKs echo values from the message as raw bytes with the message's own delimiters.
//! - **Never panics on any input.** No indexing that can go out of bounds, no `unwrap` on input,
//!   no unchecked arithmetic on peer-controlled values. A property test mutates and truncates
//!   sample messages at every byte; the parser is also a fuzz target.
//! - **`Debug` never prints content.** [`Message`], [`Identifier`] and [`ack::AckInfo`] show sizes,
//!   MSH routing metadata (applications, facilities, type, control ID, version) and codes only.
//!   [`ParseError`] and [`ErrCondition`] texts name fields and positions, never values.
//!
//! ## Errors and replies
//!
//! [`ParseError`] has one variant per failure. `impl From<&ParseError> for ErrCondition` in
//! [`ack`] is the one place that maps them to HL7 table 0357 codes and ERR locations;
//! [`build_ack`] and [`nak_for_unparsed`] turn an [`Outcome`] into AA/AE/AR or CA/CE/CR shaped for
//! the message's version.

pub mod ack;
pub mod charset;
mod error;
pub mod escape;
pub mod message;
pub mod mllp;
pub mod path;
pub mod time;

pub use ack::{
    ack_info, build_ack, nak_for_unparsed, AckCode, AckInfo, AckParams, ErrCondition, ErrLocation,
    Outcome, Severity,
};
pub use charset::Charset;
pub use error::ParseError;
pub use escape::{escape, unescape};
pub use message::{AckCondition, Delimiters, Header, Identifier, Message, MessageType};
pub use path::{FieldPath, FieldPathError};
pub use time::hl7_timestamp;

#[cfg(test)]
mod tests;
