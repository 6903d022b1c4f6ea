//! MSH-18 character sets: which decoder turns field bytes into text.
//!
//! Only text views decode; the stored bytes are never re-encoded. The parser splits on single
//! delimiter bytes, so every supported character set must be ASCII-compatible (UTF-16/32 cannot
//! travel over byte-oriented MLLP with HL7 delimiters and fall back to lenient UTF-8 here).
//!
//! Mapping notes:
//! - absent, empty, `ASCII`, `ISO IR6`, `UNICODE`, `UNICODE UTF-8`, `ISO IR192` and any unknown
//!   name decode as UTF-8 with U+FFFD replacement (a lenient superset of ASCII).
//! - `8859/1` (`ISO IR100`) is decoded exactly as ISO-8859-1 (byte `n` is U+00nn) by this module,
//!   not through encoding_rs, whose `iso-8859-1` label means windows-1252.
//! - `8859/9` (`ISO IR148`) uses encoding_rs windows-1254, which the WHATWG Encoding Standard (and
//!   so encoding_rs) uses for the `iso-8859-9` label; they differ only in 0x80-0x9F.
//! - Multi-byte sets (`ISO IR87`/`JAS2020` as ISO-2022-JP, `KS X 1001` as EUC-KR,
//!   `GB 18030-2000`, `BIG-5`) decode, but a trail byte that equals a delimiter would already
//!   have split the field; HL7 forbids that, we do not repair it.

use std::borrow::Cow;

use encoding_rs::Encoding;

/// A decoder for field text, chosen from MSH-18 (first repetition).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charset {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// UTF-8, invalid sequences replaced by U+FFFD. Used for ASCII and unknown names.
    Utf8Lenient,
    /// ISO-8859-1 exactly.
    Latin1,
    /// Any other ASCII-compatible encoding that encoding_rs knows.
    Other(&'static Encoding),
}

impl Default for Charset {
    fn default() -> Self {
        Self::UTF8_LENIENT
    }
}

impl Charset {
    /// The default when MSH-18 is absent: UTF-8 with replacement (ASCII is a subset).
    pub const UTF8_LENIENT: Charset = Charset {
        kind: Kind::Utf8Lenient,
    };
    /// ISO-8859-1, decoded exactly.
    pub const LATIN1: Charset = Charset { kind: Kind::Latin1 };

    /// Picks the decoder for an MSH-18 value (one repetition, raw bytes). Case and surrounding
    /// spaces are ignored; unknown names give [`Charset::UTF8_LENIENT`].
    pub fn from_msh18(name: &[u8]) -> Charset {
        let name = name.trim_ascii();
        let mut upper = [0u8; 24];
        let Some(dst) = upper.get_mut(..name.len()) else {
            return Self::UTF8_LENIENT;
        };
        dst.copy_from_slice(name);
        dst.make_ascii_uppercase();
        let kind = match &*dst {
            b"8859/1" | b"ISO IR100" => Kind::Latin1,
            b"8859/2" | b"ISO IR101" => Kind::Other(encoding_rs::ISO_8859_2),
            b"8859/3" | b"ISO IR109" => Kind::Other(encoding_rs::ISO_8859_3),
            b"8859/4" | b"ISO IR110" => Kind::Other(encoding_rs::ISO_8859_4),
            b"8859/5" | b"ISO IR144" => Kind::Other(encoding_rs::ISO_8859_5),
            b"8859/6" | b"ISO IR127" => Kind::Other(encoding_rs::ISO_8859_6),
            b"8859/7" | b"ISO IR126" => Kind::Other(encoding_rs::ISO_8859_7),
            b"8859/8" | b"ISO IR138" => Kind::Other(encoding_rs::ISO_8859_8),
            b"8859/9" | b"ISO IR148" => Kind::Other(encoding_rs::WINDOWS_1254),
            b"8859/15" => Kind::Other(encoding_rs::ISO_8859_15),
            b"ISO IR87" | b"ISO IR159" | b"JAS2020" | b"JIS X 0202" => {
                Kind::Other(encoding_rs::ISO_2022_JP)
            }
            b"KS X 1001" => Kind::Other(encoding_rs::EUC_KR),
            b"GB 18030-2000" => Kind::Other(encoding_rs::GB18030),
            b"BIG-5" => Kind::Other(encoding_rs::BIG5),
            _ => Kind::Utf8Lenient,
        };
        Charset { kind }
    }

    /// Decodes field bytes (already unescaped) to text. Never fails: undecodable bytes become
    /// U+FFFD. Borrows when the bytes are already valid text in this charset.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Cow<'a, str> {
        match self.kind {
            Kind::Utf8Lenient => String::from_utf8_lossy(bytes),
            Kind::Latin1 => match std::str::from_utf8(bytes) {
                Ok(s) if bytes.is_ascii() => Cow::Borrowed(s),
                _ => Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
            },
            Kind::Other(enc) => enc.decode_without_bom_handling(bytes).0,
        }
    }

    /// A name for logs and metrics (the decoder, not the MSH-18 spelling).
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Utf8Lenient => "UTF-8",
            Kind::Latin1 => "ISO-8859-1",
            Kind::Other(enc) => enc.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_is_exact_not_windows_1252() {
        let cs = Charset::from_msh18(b"8859/1");
        assert_eq!(cs.decode(b"M\xfcller"), "Müller");
        // 0x80 is a C1 control in ISO-8859-1 but the euro sign in windows-1252.
        assert_eq!(cs.decode(b"\x80"), "\u{80}");
        assert_eq!(Charset::from_msh18(b" iso ir100 "), Charset::LATIN1);
    }

    #[test]
    fn names_map_to_decoders() {
        assert_eq!(Charset::from_msh18(b""), Charset::UTF8_LENIENT);
        assert_eq!(Charset::from_msh18(b"UNICODE UTF-8"), Charset::UTF8_LENIENT);
        assert_eq!(Charset::from_msh18(b"NO SUCH SET"), Charset::UTF8_LENIENT);
        assert_eq!(
            Charset::from_msh18(b"a name far longer than any known set"),
            Charset::UTF8_LENIENT
        );
        assert_eq!(Charset::from_msh18(b"8859/5").decode(b"\xb0"), "А");
        assert_eq!(Charset::from_msh18(b"8859/7").decode(b"\xe1"), "α");
        assert_eq!(Charset::UTF8_LENIENT.decode(b"a\xffb"), "a\u{fffd}b");
    }
}
