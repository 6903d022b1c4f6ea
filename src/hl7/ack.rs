//! Acknowledgements: building our ACK/NAK replies and reading ACKs received from upstream.
//!
//! Original mode (MSH-15 and MSH-16 empty) answers AA/AE/AR; enhanced mode (either valued)
//! answers CA/CE/CR as an accept acknowledgment, sent or not per the MSH-15 condition (empty
//! means `AL`). The reply is shaped for the message's version (MSH-12):
//!
//! | version   | MSH-9         | MSA-3 on error | ERR                                                    |
//! |-----------|---------------|----------------|--------------------------------------------------------|
//! | 2.1, 2.2  | `ACK`         | short text     | `ERR\|seg^seq^field^code&text&HL70357`                 |
//! | 2.3.x     | `ACK^A01`     | short text     | same (ERR-1, ELD)                                      |
//! | 2.4       | `ACK^A01^ACK` | short text     | same (ERR-1, ELD)                                      |
//! | 2.5+      | `ACK^A01^ACK` | none           | `ERR\|\|seg^seq^field^rep^comp\|code^text^HL70357\|E\|\|\|\|text` |
//!
//! An unreadable MSH-12 gets the 2.5+ shape. Values echoed from the message (MSH-3..6, MSH-10,
//! MSH-11, MSH-12.1, MSH-9.2, MSH-18 and MSH-2 itself) are copied as raw bytes, already escaped
//! with the same delimiters; our own values (timestamp, control ID, texts) are reduced to
//! printable ASCII and escaped, so the reply is valid in every ASCII-compatible MSH-18 charset.
//! Segments end with CR.

use std::fmt;

use super::error::ParseError;
use super::escape::escape;
use super::message::{component, first_line, msh_field, AckCondition, Delimiters, Message};
use super::path::FieldPath;

pub use super::time::hl7_timestamp;

/// MSA-1 acknowledgment codes (HL7 table 0008).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error (the sender may retry).
    AE,
    /// Original mode: application reject (do not retry as is).
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The table 0008 code.
    pub fn as_str(&self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// Reads a table 0008 code (case-insensitive, spaces trimmed).
    pub fn from_bytes(b: &[u8]) -> Option<AckCode> {
        let b = b.trim_ascii();
        [
            AckCode::AA,
            AckCode::AE,
            AckCode::AR,
            AckCode::CA,
            AckCode::CE,
            AckCode::CR,
        ]
        .into_iter()
        .find(|c| b.eq_ignore_ascii_case(c.as_str().as_bytes()))
    }

    /// AA or CA.
    pub fn is_accept(&self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }

    /// The code answering `outcome` in original or enhanced mode.
    pub fn for_outcome(outcome: &Outcome, enhanced: bool) -> AckCode {
        match (outcome, enhanced) {
            (Outcome::Accepted, false) => AckCode::AA,
            (Outcome::Error(_), false) => AckCode::AE,
            (Outcome::Rejected(_), false) => AckCode::AR,
            (Outcome::Accepted, true) => AckCode::CA,
            (Outcome::Error(_), true) => AckCode::CE,
            (Outcome::Rejected(_), true) => AckCode::CR,
        }
    }
}

impl fmt::Display for AckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// ERR-4 severity (HL7 table 0516).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Severity {
    /// `E`.
    #[default]
    Error,
    /// `W`.
    Warning,
    /// `I`.
    Information,
    /// `F` (v2.7+).
    Fatal,
}

impl Severity {
    /// The table 0516 code.
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Error => "E",
            Severity::Warning => "W",
            Severity::Information => "I",
            Severity::Fatal => "F",
        }
    }
}

/// Where an error is (ERR-2 ERL, or ERR-1 ELD before v2.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrLocation {
    /// Segment ID, e.g. `MSH`.
    pub segment: String,
    /// Which occurrence of that segment (1-based).
    pub sequence: u32,
    /// Field position (1-based; MSH-1 is the field separator).
    pub field: u32,
    /// Field repetition (ERL-4), when relevant; written as 1 when only a component is given.
    pub repetition: Option<u32>,
    /// Component (ERL-5), when relevant.
    pub component: Option<u32>,
}

impl ErrLocation {
    /// A field of the first MSH segment.
    pub fn msh(field: u32, component: Option<u32>) -> ErrLocation {
        ErrLocation {
            segment: "MSH".into(),
            sequence: 1,
            field,
            repetition: None,
            component,
        }
    }
}

/// An error condition to report in an ACK: HL7 table 0357 code, severity, location and a
/// diagnostic text that must never contain PHI (it is sent, logged and audited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrCondition {
    /// HL7 table 0357 code (see the associated constants).
    pub code: u16,
    /// ERR-4.
    pub severity: Severity,
    /// ERR-2 (ERR-1 before v2.5).
    pub location: Option<ErrLocation>,
    /// Diagnostic text without PHI: ERR-8 (v2.5+) and MSA-3 (before v2.5).
    pub text: String,
}

impl ErrCondition {
    /// 0: message accepted.
    pub const ACCEPTED: u16 = 0;
    /// 100: segment sequence error.
    pub const SEGMENT_SEQUENCE_ERROR: u16 = 100;
    /// 101: required field missing.
    pub const REQUIRED_FIELD_MISSING: u16 = 101;
    /// 102: data type error.
    pub const DATA_TYPE_ERROR: u16 = 102;
    /// 103: table value not found.
    pub const TABLE_VALUE_NOT_FOUND: u16 = 103;
    /// 104: value too long (v2.7+).
    pub const VALUE_TOO_LONG: u16 = 104;
    /// 200: unsupported message type.
    pub const UNSUPPORTED_MESSAGE_TYPE: u16 = 200;
    /// 201: unsupported event code.
    pub const UNSUPPORTED_EVENT_CODE: u16 = 201;
    /// 202: unsupported processing ID.
    pub const UNSUPPORTED_PROCESSING_ID: u16 = 202;
    /// 203: unsupported version ID.
    pub const UNSUPPORTED_VERSION_ID: u16 = 203;
    /// 204: unknown key identifier.
    pub const UNKNOWN_KEY_IDENTIFIER: u16 = 204;
    /// 205: duplicate key identifier.
    pub const DUPLICATE_KEY_IDENTIFIER: u16 = 205;
    /// 206: application record locked.
    pub const APPLICATION_RECORD_LOCKED: u16 = 206;
    /// 207: application internal error.
    pub const APPLICATION_INTERNAL_ERROR: u16 = 207;

    /// A condition without location. `text` must not contain PHI.
    pub fn new(code: u16, severity: Severity, text: impl Into<String>) -> ErrCondition {
        ErrCondition {
            code,
            severity,
            location: None,
            text: text.into(),
        }
    }

    /// Adds a location.
    pub fn at(mut self, location: ErrLocation) -> ErrCondition {
        self.location = Some(location);
        self
    }

    /// The table 0357 description of a code (ERR-3.2), `Unknown error` for codes outside it.
    pub fn description(code: u16) -> &'static str {
        match code {
            0 => "Message accepted",
            100 => "Segment sequence error",
            101 => "Required field missing",
            102 => "Data type error",
            103 => "Table value not found",
            104 => "Value too long",
            200 => "Unsupported message type",
            201 => "Unsupported event code",
            202 => "Unsupported processing id",
            203 => "Unsupported version id",
            204 => "Unknown key identifier",
            205 => "Duplicate key identifier",
            206 => "Application record locked",
            207 => "Application internal error",
            _ => "Unknown error",
        }
    }
}

/// The one place where parse failures become protocol replies.
impl From<&ParseError> for ErrCondition {
    fn from(e: &ParseError) -> ErrCondition {
        let text = e.to_string();
        match e {
            ParseError::Empty | ParseError::MissingMsh | ParseError::BadSegmentId { .. } => {
                ErrCondition::new(ErrCondition::SEGMENT_SEQUENCE_ERROR, Severity::Error, text)
            }
            ParseError::BadEncodingCharacters { .. } => {
                ErrCondition::new(ErrCondition::DATA_TYPE_ERROR, Severity::Error, text)
                    .at(ErrLocation::msh(2, None))
            }
            ParseError::MissingRequiredField { field, component } => {
                ErrCondition::new(ErrCondition::REQUIRED_FIELD_MISSING, Severity::Error, text)
                    .at(ErrLocation::msh(*field, *component))
            }
        }
    }
}

impl ParseError {
    /// The HL7 error condition for this failure (same as `ErrCondition::from(self)`).
    pub fn hl7_error(&self) -> ErrCondition {
        ErrCondition::from(self)
    }

    /// A parse failure is a reject (AR/CR): resending the same bytes cannot succeed.
    pub fn outcome(&self) -> Outcome {
        Outcome::Rejected(self.hl7_error())
    }
}

/// What the gateway decided about a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored durably: AA / CA.
    Accepted,
    /// Not stored, the sender should retry later (e.g. storage busy): AE / CE.
    Error(ErrCondition),
    /// Not stored and retrying will not help (bad message): AR / CR.
    Rejected(ErrCondition),
}

impl Outcome {
    /// The error condition, unless accepted.
    pub fn condition(&self) -> Option<&ErrCondition> {
        match self {
            Outcome::Accepted => None,
            Outcome::Error(c) | Outcome::Rejected(c) => Some(c),
        }
    }
}

/// Values of the ACK itself.
#[derive(Clone, Copy, Debug)]
pub struct AckParams<'a> {
    /// The ACK's MSH-7, e.g. from [`super::hl7_timestamp`].
    pub timestamp: &'a str,
    /// The ACK's own MSH-10.
    pub control_id: &'a str,
}

/// The code [`build_ack`] answers `outcome` with, or `None` when MSH-15 asks for no ACK.
pub fn ack_code_for(msg: &Message, outcome: &Outcome) -> Option<AckCode> {
    let h = msg.header();
    let enhanced = h.is_enhanced_mode();
    let success = matches!(outcome, Outcome::Accepted);
    if enhanced
        && !h
            .accept_ack
            .unwrap_or(AckCondition::Always)
            .wants_ack(success)
    {
        return None;
    }
    Some(AckCode::for_outcome(outcome, enhanced))
}

/// Builds the ACK for a parsed message, or `None` when enhanced mode MSH-15 says not to send
/// one for this outcome (`NE`; `ER` on success; `SU` on error/reject).
pub fn build_ack(msg: &Message, outcome: &Outcome, params: &AckParams<'_>) -> Option<Vec<u8>> {
    let h = msg.header();
    let enhanced = h.is_enhanced_mode();
    let code = ack_code_for(msg, outcome)?;
    Some(write_ack(
        msg.msh_line(),
        msg.delimiters(),
        code,
        outcome.condition(),
        enhanced,
        params,
    ))
}

/// Best-effort reject (AR, or CR when MSH-15/16 are valued) for bytes that failed to parse,
/// echoing whatever MSH-3..6, MSH-9.2, MSH-10, MSH-11 and MSH-12 can be found in the first line.
/// Sent whatever MSH-15 says, since the header is not trustworthy. `None` when there is no MSH
/// with usable delimiters: the caller should close the connection.
pub fn nak_for_unparsed(raw: &[u8], err: &ParseError, params: &AckParams<'_>) -> Option<Vec<u8>> {
    let line = first_line(raw);
    let (d, _) = Delimiters::from_msh(line).ok()?;
    let enhanced = !msh_field(line, &d, 15).is_empty() || !msh_field(line, &d, 16).is_empty();
    let condition = ErrCondition::from(err);
    let code = if enhanced { AckCode::CR } else { AckCode::AR };
    Some(write_ack(
        line,
        &d,
        code,
        Some(&condition),
        enhanced,
        params,
    ))
}

/// `(major, minor)` of MSH-12.1; `None` when unreadable.
fn version(v: &[u8]) -> Option<(u32, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Printable ASCII only (others become `?`), at most `max` characters, then escaped.
fn our_text(s: &str, d: &Delimiters, max: usize) -> String {
    let ascii: String = s
        .chars()
        .take(max)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    escape(&ascii, d)
}

fn write_ack(
    line: &[u8],
    d: &Delimiters,
    code: AckCode,
    err: Option<&ErrCondition>,
    enhanced: bool,
    params: &AckParams<'_>,
) -> Vec<u8> {
    let f = |n: u32| msh_field(line, d, n);
    let ver_raw = component(line, d, 12, Some(1));
    let ver = version(ver_raw).unwrap_or((2, 9));
    let modern = ver >= (2, 5);
    let trigger = component(line, d, 9, Some(2));
    let charset = f(18);
    let (fs, cs) = (d.field, d.component);

    let mut out = Vec::with_capacity(256 + line.len() / 2);
    out.extend_from_slice(b"MSH");
    out.push(fs);
    out.extend_from_slice(component(line, d, 2, None));
    for n in [5, 6, 3, 4] {
        out.push(fs);
        out.extend_from_slice(f(n));
    }
    out.push(fs);
    out.extend_from_slice(our_text(params.timestamp, d, 40).as_bytes());
    out.push(fs);
    out.push(fs);
    out.extend_from_slice(b"ACK");
    if ver >= (2, 3) && (!trigger.is_empty() || ver >= (2, 4)) {
        out.push(cs);
        out.extend_from_slice(trigger);
        if ver >= (2, 4) {
            out.push(cs);
            out.extend_from_slice(b"ACK");
        }
    }
    out.push(fs);
    out.extend_from_slice(our_text(params.control_id, d, 199).as_bytes());
    out.push(fs);
    out.extend_from_slice(f(11));
    out.push(fs);
    out.extend_from_slice(ver_raw);
    if enhanced || !charset.is_empty() {
        out.extend_from_slice(&[fs, fs, fs]);
        if enhanced {
            out.extend_from_slice(b"NE");
        }
        out.push(fs);
        if enhanced {
            out.extend_from_slice(b"NE");
        }
    }
    if !charset.is_empty() {
        out.extend_from_slice(&[fs, fs]);
        out.extend_from_slice(charset);
    }
    out.push(b'\r');

    out.extend_from_slice(b"MSA");
    out.push(fs);
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(fs);
    out.extend_from_slice(f(10));
    if let (Some(e), false) = (err, modern) {
        out.push(fs);
        out.extend_from_slice(our_text(&e.text, d, 80).as_bytes());
    }
    out.push(b'\r');

    if let Some(e) = err {
        let num = |out: &mut Vec<u8>, n: u32| out.extend_from_slice(n.to_string().as_bytes());
        let desc = our_text(ErrCondition::description(e.code), d, 80);
        out.extend_from_slice(b"ERR");
        out.push(fs);
        if modern {
            out.push(fs);
            if let Some(loc) = &e.location {
                out.extend_from_slice(our_text(&loc.segment, d, 3).as_bytes());
                out.push(cs);
                num(&mut out, loc.sequence);
                out.push(cs);
                num(&mut out, loc.field);
                if loc.repetition.is_some() || loc.component.is_some() {
                    out.push(cs);
                    num(&mut out, loc.repetition.unwrap_or(1));
                }
                if let Some(c) = loc.component {
                    out.push(cs);
                    num(&mut out, c);
                }
            }
            out.push(fs);
            num(&mut out, u32::from(e.code));
            out.push(cs);
            out.extend_from_slice(desc.as_bytes());
            out.push(cs);
            out.extend_from_slice(b"HL70357");
            out.push(fs);
            out.extend_from_slice(e.severity.as_str().as_bytes());
            out.extend_from_slice(&[fs, fs, fs, fs]);
            out.extend_from_slice(our_text(&e.text, d, 250).as_bytes());
        } else {
            if let Some(loc) = &e.location {
                out.extend_from_slice(our_text(&loc.segment, d, 3).as_bytes());
                out.push(cs);
                num(&mut out, loc.sequence);
                out.push(cs);
                num(&mut out, loc.field);
            } else {
                out.push(cs);
                out.push(cs);
            }
            out.push(cs);
            num(&mut out, u32::from(e.code));
            out.push(d.subcomponent);
            out.extend_from_slice(desc.as_bytes());
            out.push(d.subcomponent);
            out.extend_from_slice(b"HL70357");
        }
        out.push(b'\r');
    }
    out
}

/// What an upstream ACK said (read by the forwarder to classify delivery).
#[derive(Clone, PartialEq, Eq)]
pub struct AckInfo {
    /// MSA-1.
    pub code: AckCode,
    /// MSA-2, the control ID being acknowledged.
    pub control_id: String,
    /// MSA-3, else ERR-8, else the ERR-3.2 / ERR-1.4.2 description. It comes from the peer and
    /// may contain PHI: never log it; `Debug` shows only its length.
    pub text: Option<String>,
    /// ERR-3.1 (v2.5+), else ERR-1.4.1, when numeric.
    pub err_code: Option<u16>,
}

impl fmt::Debug for AckInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckInfo")
            .field("code", &self.code)
            .field("control_id", &self.control_id)
            .field(
                "text",
                &format_args!("<{} bytes>", self.text.as_ref().map_or(0, String::len)),
            )
            .field("err_code", &self.err_code)
            .finish()
    }
}

fn path(seg: &[u8; 3], field: u32, comp: Option<u32>, sub: Option<u32>) -> FieldPath {
    FieldPath {
        segment: *seg,
        segment_index: 1,
        field,
        repetition: None,
        component: comp,
        subcomponent: sub,
    }
}

/// Reads MSA (and ERR) of a received acknowledgment; `None` without an MSA with a known code.
pub fn ack_info(msg: &Message) -> Option<AckInfo> {
    let code = AckCode::from_bytes(msg.get(&path(b"MSA", 1, None, None))?)?;
    let control_id = msg.text(&path(b"MSA", 2, None, None)).unwrap_or_default();
    let text = [
        path(b"MSA", 3, None, None),
        path(b"ERR", 8, None, None),
        path(b"ERR", 3, Some(2), None),
        path(b"ERR", 1, Some(4), Some(2)),
    ]
    .iter()
    .find_map(|p| msg.text(p));
    let err_code = [
        path(b"ERR", 3, Some(1), None),
        path(b"ERR", 1, Some(4), Some(1)),
    ]
    .iter()
    .find_map(|p| {
        let v = msg.get(p)?;
        std::str::from_utf8(v).ok()?.trim().parse().ok()
    });
    Some(AckInfo {
        code,
        control_id,
        text,
        err_code,
    })
}
