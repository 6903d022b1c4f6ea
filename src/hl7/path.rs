//! Field paths such as `PID-3[2].1`, `OBX[2]-5`, `MSH-9.2` or `PID-3[1].4.1`.
//!
//! Grammar: `SEG ["[" n "]"] "-" field ["[" rep "]"] ["." component ["." subcomponent]]`, where
//! `SEG` is three uppercase letters or digits and every number is a 1-based index (1..=65535).
//! `SEG[n]` picks the n-th segment with that ID (default the first).
//!
//! What a path selects (see [`crate::hl7::Message::get`]):
//! - `PID-3`: the whole field, every repetition included;
//! - `PID-3[2]`: the second repetition, all its components;
//! - `PID-3.1` (component without repetition): component 1 of the *first* repetition;
//! - `PID-3[1].4.1`: subcomponent 1 of component 4 of repetition 1.

use std::fmt;
use std::str::FromStr;

/// A parsed field path. Indices are 1-based and never zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPath {
    pub(crate) segment: [u8; 3],
    pub(crate) segment_index: u32,
    pub(crate) field: u32,
    pub(crate) repetition: Option<u32>,
    pub(crate) component: Option<u32>,
    pub(crate) subcomponent: Option<u32>,
}

/// Why a field path did not parse. `at` is the byte offset in the path text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldPathError {
    /// The path was empty.
    #[error("field path is empty")]
    Empty,
    /// The segment ID is not three uppercase letters or digits.
    #[error("field path must start with a segment ID of three uppercase letters or digits")]
    BadSegmentId,
    /// The `-` between segment and field is missing.
    #[error("expected '-' after the segment at byte {at}")]
    MissingDash {
        /// Byte offset in the path.
        at: usize,
    },
    /// A number was expected (field, repetition, component, subcomponent or segment index).
    #[error("expected a {what} number at byte {at}")]
    ExpectedNumber {
        /// Which index was being read.
        what: &'static str,
        /// Byte offset in the path.
        at: usize,
    },
    /// A number was zero or above 65535.
    #[error("{what} number at byte {at} is out of range (1..=65535)")]
    OutOfRange {
        /// Which index was being read.
        what: &'static str,
        /// Byte offset in the path.
        at: usize,
    },
    /// A `[` was not closed by `]`.
    #[error("expected ']' at byte {at}")]
    UnclosedBracket {
        /// Byte offset in the path.
        at: usize,
    },
    /// Something follows a complete path (for example a third `.` level).
    #[error("unexpected character at byte {at}")]
    Trailing {
        /// Byte offset in the path.
        at: usize,
    },
}

impl FieldPath {
    /// The path of a whole field, e.g. `FieldPath::field(*b"PID", 3)` for `PID-3`; `None` when
    /// the segment ID is invalid or `field` is 0.
    pub fn field(segment: [u8; 3], field: u32) -> Option<FieldPath> {
        let ok = segment
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        (ok && field > 0).then_some(FieldPath {
            segment,
            segment_index: 1,
            field,
            repetition: None,
            component: None,
            subcomponent: None,
        })
    }

    /// Segment ID bytes, e.g. `b"PID"`.
    pub fn segment(&self) -> &[u8; 3] {
        &self.segment
    }
    /// Which occurrence of the segment (1-based).
    pub fn segment_index(&self) -> u32 {
        self.segment_index
    }
    /// Field number (1-based; for MSH, MSH-1 is the field separator).
    pub fn field_number(&self) -> u32 {
        self.field
    }
    /// Repetition, when given.
    pub fn repetition(&self) -> Option<u32> {
        self.repetition
    }
    /// Component, when given.
    pub fn component(&self) -> Option<u32> {
        self.component
    }
    /// Subcomponent, when given.
    pub fn subcomponent(&self) -> Option<u32> {
        self.subcomponent
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.at += 1;
        }
        hit
    }
    fn number(&mut self, what: &'static str) -> Result<u32, FieldPathError> {
        let start = self.at;
        let mut n: u32 = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u32::from(d - b'0')))
                .filter(|&n| n <= 65535)
                .ok_or(FieldPathError::OutOfRange { what, at: start })?;
            self.at += 1;
        }
        if self.at == start {
            return Err(FieldPathError::ExpectedNumber { what, at: start });
        }
        if n == 0 {
            return Err(FieldPathError::OutOfRange { what, at: start });
        }
        Ok(n)
    }
    fn bracketed(&mut self, what: &'static str) -> Result<Option<u32>, FieldPathError> {
        if !self.eat(b'[') {
            return Ok(None);
        }
        let n = self.number(what)?;
        if !self.eat(b']') {
            return Err(FieldPathError::UnclosedBracket { at: self.at });
        }
        Ok(Some(n))
    }
}

impl FromStr for FieldPath {
    type Err = FieldPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return Err(FieldPathError::Empty);
        }
        let segment: [u8; 3] = match bytes.get(..3) {
            Some([a, b, c]) => [*a, *b, *c],
            _ => return Err(FieldPathError::BadSegmentId),
        };
        if !segment
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(FieldPathError::BadSegmentId);
        }
        let mut c = Cursor { s: bytes, at: 3 };
        let segment_index = c.bracketed("segment index")?.unwrap_or(1);
        if !c.eat(b'-') {
            return Err(FieldPathError::MissingDash { at: c.at });
        }
        let field = c.number("field")?;
        let repetition = c.bracketed("repetition")?;
        let component = if c.eat(b'.') {
            Some(c.number("component")?)
        } else {
            None
        };
        let subcomponent = if component.is_some() && c.eat(b'.') {
            Some(c.number("subcomponent")?)
        } else {
            None
        };
        if c.peek().is_some() {
            return Err(FieldPathError::Trailing { at: c.at });
        }
        Ok(FieldPath {
            segment,
            segment_index,
            field,
            repetition,
            component,
            subcomponent,
        })
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.segment {
            write!(f, "{}", char::from(b))?;
        }
        if self.segment_index != 1 {
            write!(f, "[{}]", self.segment_index)?;
        }
        write!(f, "-{}", self.field)?;
        if let Some(r) = self.repetition {
            write!(f, "[{r}]")?;
        }
        if let Some(c) = self.component {
            write!(f, ".{c}")?;
        }
        if let Some(s) = self.subcomponent {
            write!(f, ".{s}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<FieldPath, FieldPathError> {
        s.parse()
    }

    #[test]
    fn valid_paths_parse_and_display_canonically() {
        for s in [
            "PID-3",
            "PID-3[2].1",
            "PID-5.1",
            "OBX-5",
            "MSH-9.2",
            "PID-3[1].4.1",
            "OBX[2]-5",
            "ZX1-65535",
        ] {
            assert_eq!(p(s).map(|p| p.to_string()), Ok(s.to_string()), "{s}");
        }
        assert_eq!(p("PID[1]-3").map(|p| p.to_string()), Ok("PID-3".into()));
        let x = p("PID-3[1].4.1");
        assert_eq!(x.map(|x| x.subcomponent()), Ok(Some(1)));
    }

    #[test]
    fn invalid_paths_name_the_problem() {
        assert_eq!(p(""), Err(FieldPathError::Empty));
        assert_eq!(p("pid-3"), Err(FieldPathError::BadSegmentId));
        assert_eq!(p("PI"), Err(FieldPathError::BadSegmentId));
        assert_eq!(p("PID3"), Err(FieldPathError::MissingDash { at: 3 }));
        assert_eq!(
            p("PID-"),
            Err(FieldPathError::ExpectedNumber {
                what: "field",
                at: 4
            })
        );
        assert_eq!(
            p("PID-0"),
            Err(FieldPathError::OutOfRange {
                what: "field",
                at: 4
            })
        );
        assert_eq!(
            p("PID-99999999999"),
            Err(FieldPathError::OutOfRange {
                what: "field",
                at: 4
            })
        );
        assert_eq!(p("PID-3[2"), Err(FieldPathError::UnclosedBracket { at: 7 }));
        assert_eq!(
            p("PID-3[]"),
            Err(FieldPathError::ExpectedNumber {
                what: "repetition",
                at: 6
            })
        );
        assert_eq!(
            p("PID-3."),
            Err(FieldPathError::ExpectedNumber {
                what: "component",
                at: 6
            })
        );
        assert_eq!(p("PID-3.1.2.3"), Err(FieldPathError::Trailing { at: 9 }));
        assert_eq!(p("PID-3x"), Err(FieldPathError::Trailing { at: 5 }));
        assert_eq!(p("PIDé-3"), Err(FieldPathError::MissingDash { at: 3 }));
        assert!(p("PID-3").is_ok_and(|x| x.component().is_none()));
    }
}
