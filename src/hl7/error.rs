//! Why a message did not parse. Variants name what and where, never message content.
//!
//! The mapping to HL7 table 0357 codes and ERR locations lives in one place:
//! `impl From<&ParseError> for ErrCondition` in [`super::ack`].

/// A message that cannot be parsed. The `Display` text is safe to log and to send in an ACK: it
/// carries positions and field names only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No bytes, or only a BOM and whitespace.
    #[error("message is empty")]
    Empty,
    /// The first segment is not MSH (after an optional BOM and leading whitespace).
    #[error("message does not start with an MSH segment")]
    MissingMsh,
    /// MSH-1 / MSH-2 do not declare usable delimiters.
    #[error("bad MSH-1/MSH-2 encoding characters: {reason}")]
    BadEncodingCharacters {
        /// What is wrong with them.
        reason: &'static str,
    },
    /// A segment does not start with three uppercase letters or digits followed by the field
    /// separator (or the end of the segment).
    #[error("segment {segment_index} has an invalid segment ID")]
    BadSegmentId {
        /// 1-based position of the segment in the message (MSH is 1, blank lines not counted).
        segment_index: usize,
    },
    /// A header field the gateway needs is empty or absent.
    #[error("required field MSH-{field}{} is missing", component.map(|c| format!(".{c}")).unwrap_or_default())]
    MissingRequiredField {
        /// MSH field number (MSH-1 is the field separator).
        field: u32,
        /// Component, when only one component is required.
        component: Option<u32>,
    },
}
