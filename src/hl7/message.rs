//! The message model: the raw bytes plus an index of segment ranges, split into fields lazily.

use std::fmt;
use std::ops::Range;

use super::charset::Charset;
use super::error::ParseError;
use super::escape::unescape;
use super::path::FieldPath;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The delimiters a message declares in MSH-1 and MSH-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delimiters {
    /// MSH-1, usually `|`.
    pub field: u8,
    /// MSH-2 first character, usually `^`.
    pub component: u8,
    /// MSH-2 second character, usually `~`.
    pub repetition: u8,
    /// MSH-2 third character, usually `\`.
    pub escape: u8,
    /// MSH-2 fourth character, usually `&`.
    pub subcomponent: u8,
    /// MSH-2 fifth character (v2.7+), usually `#`, when declared.
    pub truncation: Option<u8>,
}

impl Default for Delimiters {
    /// `|^~\&` without a truncation character.
    fn default() -> Self {
        Delimiters {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// Reads MSH-1 and MSH-2 from a line that starts with `MSH`. Returns the delimiters and the
    /// MSH-2 bytes as written.
    pub(crate) fn from_msh(line: &[u8]) -> Result<(Delimiters, &[u8]), ParseError> {
        let bad = |reason| Err(ParseError::BadEncodingCharacters { reason });
        let Some(rest) = line.strip_prefix(b"MSH") else {
            return Err(ParseError::MissingMsh);
        };
        let Some((&field, rest)) = rest.split_first() else {
            return bad("no field separator after MSH");
        };
        let usable = |b: u8| b.is_ascii_graphic() && !b.is_ascii_alphanumeric();
        if !usable(field) {
            return bad("field separator is not a punctuation character");
        }
        let len = rest.iter().position(|&b| b == field).unwrap_or(rest.len());
        let enc = rest.get(..len).unwrap_or_default();
        let (component, repetition, escape, subcomponent, truncation) = match *enc {
            [c, r, e, s] => (c, r, e, s, None),
            [c, r, e, s, t] => (c, r, e, s, Some(t)),
            _ if enc.len() < 4 => return bad("MSH-2 has fewer than four encoding characters"),
            _ => return bad("MSH-2 has more than five encoding characters"),
        };
        if !enc.iter().all(|&b| usable(b)) {
            return bad("an encoding character is not a punctuation character");
        }
        let mut seen = [false; 256];
        for &b in std::iter::once(&field).chain(enc) {
            let slot = &mut seen[usize::from(b)];
            if *slot {
                return bad("delimiters are not distinct");
            }
            *slot = true;
        }
        let d = Delimiters {
            field,
            component,
            repetition,
            escape,
            subcomponent,
            truncation,
        };
        Ok((d, enc))
    }
}

/// MSH-15 / MSH-16 acknowledgment conditions (HL7 table 0155).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCondition {
    /// `AL`: always.
    Always,
    /// `NE`: never.
    Never,
    /// `ER`: only on error or reject.
    OnError,
    /// `SU`: only on success.
    OnSuccess,
}

impl AckCondition {
    /// Reads a table 0155 code (case-insensitive, spaces trimmed).
    pub fn from_bytes(b: &[u8]) -> Option<AckCondition> {
        let b = b.trim_ascii();
        if b.eq_ignore_ascii_case(b"AL") {
            Some(AckCondition::Always)
        } else if b.eq_ignore_ascii_case(b"NE") {
            Some(AckCondition::Never)
        } else if b.eq_ignore_ascii_case(b"ER") {
            Some(AckCondition::OnError)
        } else if b.eq_ignore_ascii_case(b"SU") {
            Some(AckCondition::OnSuccess)
        } else {
            None
        }
    }

    /// The table 0155 code.
    pub fn as_str(&self) -> &'static str {
        match self {
            AckCondition::Always => "AL",
            AckCondition::Never => "NE",
            AckCondition::OnError => "ER",
            AckCondition::OnSuccess => "SU",
        }
    }

    /// Whether an acknowledgment is due for an outcome that is (or is not) a success.
    pub fn wants_ack(&self, success: bool) -> bool {
        match self {
            AckCondition::Always => true,
            AckCondition::Never => false,
            AckCondition::OnError => !success,
            AckCondition::OnSuccess => success,
        }
    }
}

/// MSH-9: message code, trigger event, message structure.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MessageType {
    /// MSH-9.1, e.g. `ADT`.
    pub code: String,
    /// MSH-9.2, e.g. `A01`; empty only for an `ACK` without trigger (v2.1/2.2 style).
    pub trigger: String,
    /// MSH-9.3, e.g. `ADT_A01`, when valued.
    pub structure: Option<String>,
}

/// `code^trigger[^structure]` with `^`, whatever the message's delimiters (for logs and audit).
impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}^{}", self.code, self.trigger)?;
        if let Some(s) = &self.structure {
            write!(f, "^{s}")?;
        }
        Ok(())
    }
}

/// The MSH fields the gateway routes, audits and acknowledges with. Text values are unescaped
/// and charset-decoded, except MSH-3..MSH-6. Absent optional fields are empty.
///
/// MSH-3..MSH-6 are hierarchic designators kept as the whole field, charset-decoded but with
/// escape sequences left as received, e.g. `HOSP^1.2.3^ISO`; [`Header::namespace`] gives the
/// first component.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// MSH-3.
    pub sending_application: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_application: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-7.1, the message date/time as written (optional: empty when absent).
    pub datetime: String,
    /// MSH-8 (never shown by `Debug`).
    pub security: String,
    /// MSH-9 (code and trigger required; trigger may be empty for `ACK`).
    pub message_type: MessageType,
    /// MSH-10 (required).
    pub control_id: String,
    /// MSH-11.1 (required), e.g. `P`, `T`, `D`.
    pub processing_id: String,
    /// MSH-12.1 (required), e.g. `2.5.1`.
    pub version: String,
    /// MSH-15. A valued but unknown code reads as `Always`, so the sender still gets an ACK.
    pub accept_ack: Option<AckCondition>,
    /// MSH-16, read like MSH-15.
    pub app_ack: Option<AckCondition>,
    /// MSH-18 first repetition, as written, when valued.
    pub charset: Option<String>,
    /// The component separator, for [`Header::namespace`].
    component: char,
}

impl Header {
    /// The first component (HD.1 namespace ID) of one of the MSH-3..6 values, e.g. `HOSP` for
    /// `header.namespace(&header.sending_facility)` with `HOSP^1.2.3^ISO`.
    pub fn namespace<'a>(&self, hd: &'a str) -> &'a str {
        hd.split(self.component).next().unwrap_or_default()
    }

    /// Enhanced acknowledgment mode: MSH-15 or MSH-16 is valued.
    pub fn is_enhanced_mode(&self) -> bool {
        self.accept_ack.is_some() || self.app_ack.is_some()
    }
}

/// MSH metadata only; MSH-8 security is redacted.
impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("sending_application", &self.sending_application)
            .field("sending_facility", &self.sending_facility)
            .field("receiving_application", &self.receiving_application)
            .field("receiving_facility", &self.receiving_facility)
            .field("datetime", &self.datetime)
            .field("security", &format_args!("<{} bytes>", self.security.len()))
            .field("message_type", &self.message_type)
            .field("control_id", &self.control_id)
            .field("processing_id", &self.processing_id)
            .field("version", &self.version)
            .field("accept_ack", &self.accept_ack)
            .field("app_ack", &self.app_ack)
            .field("charset", &self.charset)
            .finish()
    }
}

/// One PID-3 repetition (data type CX). Text values are unescaped and charset-decoded. They
/// are patient identifiers (an MRN, a social security number): wiped when dropped.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Identifier {
    /// CX.1, the identifier itself (never empty).
    pub id: String,
    /// CX.2 check digit, when valued.
    pub check_digit: Option<String>,
    /// CX.4 assigning authority: the text of the whole component (an HD), so
    /// `HOSP&1.2.3&ISO` keeps its subcomponent separators; when valued.
    pub assigning_authority: Option<String>,
    /// CX.5 identifier type code (`MR`, `PI`, `SS`, ...), when valued.
    pub identifier_type: Option<String>,
}

/// Shows authority and type, never the identifier.
impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identifier")
            .field("id", &format_args!("<redacted>"))
            .field("assigning_authority", &self.assigning_authority)
            .field("identifier_type", &self.identifier_type)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
struct Seg {
    id: [u8; 3],
    start: usize,
    end: usize,
}

/// A parsed HL7 v2 message: the bytes exactly as received and an index over them.
///
/// Invariants: [`Message::raw`] returns the input unchanged (BOM and terminators included);
/// every accessor returns `None` rather than panicking on odd input; `Debug` prints sizes and
/// header metadata, never field content.
#[derive(Clone)]
pub struct Message {
    raw: Vec<u8>,
    delims: Delimiters,
    charset: Charset,
    segments: Vec<Seg>,
    header: Header,
}

/// The bytes are message content (PHI): wiped when the message is dropped.
impl Drop for Message {
    fn drop(&mut self) {
        crate::wipe::vec(&mut self.raw);
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("bytes", &self.raw.len())
            .field("segments", &self.segments.len())
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Start of the MSH segment: after a UTF-8 BOM and leading ASCII whitespace.
pub(crate) fn body_start(raw: &[u8]) -> usize {
    let after_bom = if raw.starts_with(BOM) { BOM.len() } else { 0 };
    let rest = raw.get(after_bom..).unwrap_or_default();
    after_bom
        + rest
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(rest.len())
}

/// The first line of the body (the MSH segment when there is one).
pub(crate) fn first_line(raw: &[u8]) -> &[u8] {
    let body = raw.get(body_start(raw)..).unwrap_or_default();
    let end = body
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(body.len());
    body.get(..end).unwrap_or_default()
}

/// The `n`-th (0-based) piece of `s` split on `sep`, as a range in `s`.
fn nth_piece(s: &[u8], sep: u8, n: usize) -> Option<Range<usize>> {
    let mut start = 0;
    let mut index = 0;
    for (i, &b) in s.iter().enumerate() {
        if b == sep {
            if index == n {
                return Some(start..i);
            }
            index += 1;
            start = i + 1;
        }
    }
    (index == n).then_some(start..s.len())
}

/// Narrows `r` (a range in `line`) to its `n`-th (1-based) piece split on `sep`.
fn narrow(line: &[u8], r: Range<usize>, sep: u8, n: u32) -> Option<Range<usize>> {
    let n = usize::try_from(n.checked_sub(1)?).ok()?;
    let inner = nth_piece(line.get(r.clone())?, sep, n)?;
    Some(r.start + inner.start..r.start + inner.end)
}

/// Locates a path inside one segment line. MSH-1 is the field separator byte and MSH-2 the
/// encoding characters, neither split further.
pub(crate) fn locate_in_segment(
    line: &[u8],
    d: &Delimiters,
    path: &FieldPath,
) -> Option<Range<usize>> {
    let is_msh = path.segment == *b"MSH";
    if is_msh && path.field <= 2 {
        let first = |x: Option<u32>| x.unwrap_or(1) == 1;
        if !(first(path.repetition) && first(path.component) && first(path.subcomponent)) {
            return None;
        }
        return if path.field == 1 {
            (line.len() > 3).then_some(3..4)
        } else {
            nth_piece(line, d.field, 1)
        };
    }
    let index = usize::try_from(path.field).ok()?;
    let index = if is_msh { index.checked_sub(1)? } else { index };
    let mut r = nth_piece(line, d.field, index)?;
    if path.repetition.is_some() || path.component.is_some() {
        r = narrow(line, r, d.repetition, path.repetition.unwrap_or(1))?;
    }
    if let Some(c) = path.component {
        r = narrow(line, r, d.component, c)?;
        if let Some(s) = path.subcomponent {
            r = narrow(line, r, d.subcomponent, s)?;
        }
    }
    Some(r)
}

/// A field of the MSH line by HL7 number (3..), as raw bytes; empty when absent.
pub(crate) fn msh_field<'a>(line: &'a [u8], d: &Delimiters, field: u32) -> &'a [u8] {
    component(line, d, field, None)
}

/// A component (1-based) of an MSH field's first repetition, or the whole field for `None`.
pub(crate) fn component<'a>(
    line: &'a [u8],
    d: &Delimiters,
    field: u32,
    comp: Option<u32>,
) -> &'a [u8] {
    let path = FieldPath {
        segment: *b"MSH",
        segment_index: 1,
        field,
        repetition: None,
        component: comp,
        subcomponent: None,
    };
    locate_in_segment(line, d, &path)
        .and_then(|r| line.get(r))
        .unwrap_or_default()
}

impl Message {
    /// Parses a copy of `raw`. See [`Message::parse_owned`].
    pub fn parse(raw: &[u8]) -> Result<Message, ParseError> {
        Self::parse_owned(raw.to_vec()).map_err(|(e, mut copy)| {
            crate::wipe::vec(&mut copy);
            e
        })
    }

    /// Parses `raw`, keeping it as the message's storage. On failure the bytes are handed back
    /// with the error (for [`crate::hl7::ack::nak_for_unparsed`]).
    ///
    /// Lenient on purpose: a BOM, leading whitespace, blank lines between segments, CR, LF or
    /// CRLF terminators, a missing final terminator and trailing empty fields are accepted.
    /// Required: an MSH first segment with valid MSH-1/MSH-2, MSH-9.1, MSH-9.2 (except for
    /// `ACK`), MSH-10, MSH-11.1 and MSH-12.1; every segment ID three uppercase letters or digits.
    /// MSH-7 is optional.
    pub fn parse_owned(raw: Vec<u8>) -> Result<Message, (ParseError, Vec<u8>)> {
        match index(&raw) {
            Ok((delims, charset, segments, header)) => Ok(Message {
                raw,
                delims,
                charset,
                segments,
                header,
            }),
            Err(e) => Err((e, raw)),
        }
    }

    /// The bytes exactly as received.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Gives back the bytes exactly as received.
    pub fn into_raw(mut self) -> Vec<u8> {
        std::mem::take(&mut self.raw)
    }

    /// The typed MSH fields.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Delimiters from MSH-1/MSH-2.
    pub fn delimiters(&self) -> &Delimiters {
        &self.delims
    }

    /// The decoder chosen from MSH-18.
    pub fn charset(&self) -> Charset {
        self.charset
    }

    /// Number of segments (blank lines not counted).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Segment IDs in order, e.g. `MSH`, `EVN`, `PID`. Segment IDs are not PHI.
    pub fn segment_ids(&self) -> impl Iterator<Item = &[u8; 3]> + '_ {
        self.segments.iter().map(|s| &s.id)
    }

    /// The raw MSH segment line (no terminator).
    pub(crate) fn msh_line(&self) -> &[u8] {
        self.segments
            .first()
            .and_then(|s| self.raw.get(s.start..s.end))
            .unwrap_or_default()
    }

    /// The raw line of the `n`-th (1-based) segment with ID `id`.
    fn segment_line(&self, id: &[u8; 3], n: u32) -> Option<(usize, &[u8])> {
        let n = usize::try_from(n.checked_sub(1)?).ok()?;
        let seg = self.segments.iter().filter(|s| s.id == *id).nth(n)?;
        Some((seg.start, self.raw.get(seg.start..seg.end)?))
    }

    /// Where `path` is in [`Message::raw`], when the element exists (even if empty). Useful to
    /// rewrite a value in place.
    pub fn locate(&self, path: &FieldPath) -> Option<Range<usize>> {
        let (start, line) = self.segment_line(&path.segment, path.segment_index)?;
        let r = locate_in_segment(line, &self.delims, path)?;
        Some(start + r.start..start + r.end)
    }

    /// The raw (still escaped) bytes at `path`; `None` when absent or empty. See
    /// [`FieldPath`] for what a path selects.
    pub fn get(&self, path: &FieldPath) -> Option<&[u8]> {
        self.locate(path)
            .and_then(|r| self.raw.get(r))
            .filter(|v| !v.is_empty())
    }

    /// The text at `path`: unescaped, then decoded with the MSH-18 charset; `None` when absent
    /// or empty. MSH-1 and MSH-2 are returned literally.
    pub fn text(&self, path: &FieldPath) -> Option<String> {
        let raw = self.get(path)?;
        if path.segment == *b"MSH" && path.field <= 2 {
            return Some(String::from_utf8_lossy(raw).into_owned());
        }
        Some(self.decode(raw))
    }

    /// Unescapes and decodes raw field bytes of this message.
    pub fn decode(&self, raw: &[u8]) -> String {
        decode_with(raw, &self.delims, self.charset)
    }

    /// PID-3 repetitions of the first PID segment, skipping those without CX.1. Empty when
    /// there is no PID.
    pub fn mrns(&self) -> Vec<Identifier> {
        let Some((_, line)) = self.segment_line(b"PID", 1) else {
            return Vec::new();
        };
        let d = &self.delims;
        let Some(field) = nth_piece(line, d.field, 3).and_then(|r| line.get(r)) else {
            return Vec::new();
        };
        let text = |rep: &[u8], n: usize| -> Option<String> {
            let r = nth_piece(rep, d.component, n)?;
            rep.get(r).filter(|v| !v.is_empty()).map(|v| self.decode(v))
        };
        field
            .split(|&b| b == d.repetition)
            .filter_map(|rep| {
                let id = text(rep, 0).filter(|s| !s.is_empty())?;
                Some(Identifier {
                    id,
                    check_digit: text(rep, 1),
                    assigning_authority: text(rep, 3),
                    identifier_type: text(rep, 4),
                })
            })
            .collect()
    }
}

fn decode_with(raw: &[u8], d: &Delimiters, charset: Charset) -> String {
    let bytes = unescape(raw, d);
    charset.decode(&bytes).into_owned()
}

/// Splits segments, checks IDs and reads the header.
#[allow(clippy::type_complexity)]
fn index(raw: &[u8]) -> Result<(Delimiters, Charset, Vec<Seg>, Header), ParseError> {
    let start = body_start(raw);
    let body = raw.get(start..).unwrap_or_default();
    if body.is_empty() {
        return Err(ParseError::Empty);
    }
    let (delims, _) = Delimiters::from_msh(first_line(raw))?;

    let mut segments = Vec::with_capacity(16);
    let mut pos = start;
    while let Some(rest) = raw.get(pos..).filter(|r| !r.is_empty()) {
        let len = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        let line = rest.get(..len).unwrap_or_default();
        if !line.iter().all(u8::is_ascii_whitespace) {
            let id = match line {
                [a, b, c] | [a, b, c, ..]
                    if [a, b, c]
                        .iter()
                        .all(|x| x.is_ascii_uppercase() || x.is_ascii_digit())
                        && line.get(3).map_or(true, |&x| x == delims.field) =>
                {
                    [*a, *b, *c]
                }
                _ => {
                    return Err(ParseError::BadSegmentId {
                        segment_index: segments.len() + 1,
                    })
                }
            };
            segments.push(Seg {
                id,
                start: pos,
                end: pos + len,
            });
        }
        pos += len + 1;
    }

    let msh = first_line(raw);
    let d = &delims;
    let charset_raw = narrow(
        msh,
        nth_piece(msh, d.field, 17).unwrap_or(0..0),
        d.repetition,
        1,
    )
    .and_then(|r| msh.get(r))
    .unwrap_or_default();
    let charset = Charset::from_msh18(charset_raw);
    let required = |field: u32, comp: Option<u32>| {
        let v = component(msh, d, field, comp);
        if v.is_empty() {
            Err(ParseError::MissingRequiredField {
                field,
                component: comp,
            })
        } else {
            Ok(v)
        }
    };
    let text = |v: &[u8]| decode_with(v, d, charset);
    let code = text(required(9, Some(1))?);
    let trigger = if code == "ACK" {
        text(component(msh, d, 9, Some(2)))
    } else {
        text(required(9, Some(2))?)
    };
    let structure = Some(component(msh, d, 9, Some(3)))
        .filter(|v| !v.is_empty())
        .map(text);
    let control_id = text(required(10, None)?);
    let processing_id = text(required(11, Some(1))?);
    let version = text(required(12, Some(1))?);
    let hd = |field: u32| charset.decode(msh_field(msh, d, field)).into_owned();
    let condition = |field: u32| {
        let v = msh_field(msh, d, field);
        (!v.is_empty()).then(|| AckCondition::from_bytes(v).unwrap_or(AckCondition::Always))
    };
    let header = Header {
        sending_application: hd(3),
        sending_facility: hd(4),
        receiving_application: hd(5),
        receiving_facility: hd(6),
        datetime: text(component(msh, d, 7, Some(1))),
        security: text(msh_field(msh, d, 8)),
        message_type: MessageType {
            code,
            trigger,
            structure,
        },
        control_id,
        processing_id,
        version,
        accept_ack: condition(15),
        app_ack: condition(16),
        charset: (!charset_raw.is_empty()).then(|| String::from_utf8_lossy(charset_raw).into()),
        component: char::from(d.component),
    };
    Ok((delims, charset, segments, header))
}
