//! HL7 escape sequences (v2.x chapter 2.7): `\F\ \S\ \T\ \R\ \E\ \P\ \Xhh..\`.
//!
//! [`unescape`] works on bytes, before charset decoding, so `\Xhh\` bytes are decoded in the
//! message's character set. Sequences it does not translate (`\H\ \N\ \.br\ \Cxxyy\ \Mxxyyzz\
//! \Zxx\`, malformed hex, an unterminated escape) are kept verbatim, escape characters included.
//! [`escape`] builds values for messages we write (ACK texts).

use std::borrow::Cow;

use super::message::Delimiters;

/// Replaces the delimiter escapes and `\Xhh..\` by the bytes they stand for. Borrows when the
/// value holds no escape character. Never fails; unknown or malformed sequences stay as they are.
pub fn unescape<'a>(value: &'a [u8], d: &Delimiters) -> Cow<'a, [u8]> {
    if !value.contains(&d.escape) {
        return Cow::Borrowed(value);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.iter().position(|&b| b == d.escape) {
        let (before, from_escape) = rest.split_at(at);
        out.extend_from_slice(before);
        let after = from_escape.get(1..).unwrap_or_default();
        let Some(len) = after.iter().position(|&b| b == d.escape) else {
            // Unterminated: keep the rest verbatim.
            out.extend_from_slice(from_escape);
            return Cow::Owned(out);
        };
        let (body, closing) = after.split_at(len);
        if !translate(body, d, &mut out) {
            out.push(d.escape);
            out.extend_from_slice(body);
            out.push(d.escape);
        }
        rest = closing.get(1..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    Cow::Owned(out)
}

/// Appends the bytes for one escape body; false when it is not one we translate.
fn translate(body: &[u8], d: &Delimiters, out: &mut Vec<u8>) -> bool {
    let byte = match body {
        b"F" => Some(d.field),
        b"S" => Some(d.component),
        b"T" => Some(d.subcomponent),
        b"R" => Some(d.repetition),
        b"E" => Some(d.escape),
        b"P" => d.truncation,
        _ => None,
    };
    if let Some(b) = byte {
        out.push(b);
        return true;
    }
    let Some(hex) = body.strip_prefix(b"X") else {
        return false;
    };
    if hex.is_empty() || hex.len() % 2 != 0 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return false;
    }
    for pair in hex.chunks_exact(2) {
        if let [hi, lo] = pair {
            out.push((hex_value(*hi) << 4) | hex_value(*lo));
        }
    }
    true
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Escapes a text value for a message using `d`: delimiters become `\F\ \S\ \T\ \R\ \E\ \P\`,
/// control characters (CR, LF, ...) become `\Xhh\` so a value can never end a segment. Other
/// characters pass through; encoding the result for a non-UTF-8 MSH-18 is the caller's job.
pub fn escape(value: &str, d: &Delimiters) -> String {
    let mut out = String::with_capacity(value.len());
    let esc = char::from(d.escape);
    for c in value.chars() {
        let code = match u8::try_from(c) {
            Ok(b) if b == d.field => Some('F'),
            Ok(b) if b == d.component => Some('S'),
            Ok(b) if b == d.subcomponent => Some('T'),
            Ok(b) if b == d.repetition => Some('R'),
            Ok(b) if b == d.escape => Some('E'),
            Ok(b) if Some(b) == d.truncation => Some('P'),
            _ => None,
        };
        if let Some(code) = code {
            out.push(esc);
            out.push(code);
            out.push(esc);
        } else if c.is_ascii_control() {
            out.push(esc);
            out.push_str(&format!("X{:02X}", u32::from(c)));
            out.push(esc);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(s: &[u8]) -> Vec<u8> {
        unescape(s, &Delimiters::default()).into_owned()
    }

    #[test]
    fn delimiter_escapes_are_translated() {
        assert_eq!(un(br"a\F\b\S\c\T\d\R\e\E\f"), b"a|b^c&d~e\\f");
        assert!(matches!(
            unescape(b"plain", &Delimiters::default()),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn hex_and_unknown_escapes() {
        assert_eq!(un(br"\X41\\X4243\"), b"ABC");
        assert_eq!(un(br"x\H\bold\N\y"), br"x\H\bold\N\y");
        assert_eq!(un(br"\.br\\Zab\"), br"\.br\\Zab\");
        assert_eq!(un(br"\X4\"), br"\X4\");
        assert_eq!(un(br"\XZZ\"), br"\XZZ\");
        assert_eq!(un(br"tail\F"), br"tail\F");
        assert_eq!(un(br"\\"), br"\\");
        // \P\ is the truncation character only when MSH-2 declares one.
        assert_eq!(un(br"\P\"), br"\P\");
        let with_trunc = Delimiters {
            truncation: Some(b'#'),
            ..Delimiters::default()
        };
        assert_eq!(&*unescape(br"\P\", &with_trunc), b"#");
    }

    #[test]
    fn escape_round_trips() {
        let d = Delimiters {
            truncation: Some(b'#'),
            ..Delimiters::default()
        };
        let text = "a|b^c&d~e\\f#g\r\nh é";
        let e = escape(text, &d);
        assert_eq!(e, r"a\F\b\S\c\T\d\R\e\E\f\P\g\X0D\\X0A\h é");
        assert_eq!(&*unescape(e.as_bytes(), &d), text.as_bytes());
    }
}
