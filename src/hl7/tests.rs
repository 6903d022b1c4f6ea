//! Parser and ACK builder tests over realistic messages, plus a no-panic property test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const PARAMS: AckParams<'static> = AckParams {
    timestamp: "20240301120001+0000",
    control_id: "ACK0001",
};

/// Joins segments with CR and ends with CR.
fn msg(segments: &[&str]) -> Vec<u8> {
    let mut v = segments.join("\r").into_bytes();
    v.push(b'\r');
    v
}

fn path(s: &str) -> FieldPath {
    s.parse().unwrap()
}

fn text(m: &Message, p: &str) -> Option<String> {
    m.text(&path(p))
}

fn get<'a>(m: &'a Message, p: &str) -> Option<&'a [u8]> {
    m.get(&path(p))
}

fn ack_str(m: &Message, outcome: &Outcome) -> Option<String> {
    build_ack(m, outcome, &PARAMS).map(|v| String::from_utf8(v).unwrap())
}

fn adt_a01() -> Vec<u8> {
    msg(&[
        r"MSH|^~\&|EPIC|HOSP^1.2.3^ISO|HL7EDGE|CENTRAL|20240301120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1",
        r"EVN|A01|20240301120000",
        r"PID|1||123456^^^HOSP&1.2.840.1&ISO^MR~987654320^^^SSA^SS~^^^X^PI||DOE^JOHN^Q||19800101|M|||1 MAIN ST^^SPRINGFIELD^IL^62701||555-1234",
        r"PV1|1|I|W^101^1||||||||||||||||V0001",
    ])
}

fn oru_r01() -> Vec<u8> {
    msg(&[
        r"MSH|^~\&|LAB|CLINIC|EHR|HOSP|20240301||ORU^R01|LAB0001|P|2.3.1",
        r"PID|1||55555^7^M10^LAB^MR||SMITH^ANNA",
        r"OBR|1|ORD1|FIL1|CBC^Complete blood count^L",
        r"OBX|1|NM|WBC^White cells^L||7.2|10*9/L|4.0-11.0|N|||F",
        r"OBX|2|NM|HGB^Hemoglobin^L||13.5|g/dL|12-16|N|||F",
        r"OBX|3|TX|NOTE^Note^L||a\F\b\S\c\T\d\R\e\E\f \X41\\X4243\ \H\bold\N\ \Zq1\|||||F",
    ])
}

fn orm_o01() -> Vec<u8> {
    msg(&[
        r"MSH|^~\&|EHR|CLINIC|RIS|HOSP|20240301||ORM^O01|ORM01|P|2.4",
        r"PID|1||777^^^CLINIC^MR||ROE^RICHARD",
        r"ORC|NW|ORD777",
        r"OBR|1|ORD777||71020^CHEST XRAY^CPT4",
        r"ZDS|1.2.3.4^RIS^Application^DICOM",
    ])
}

fn with_version(v: &str, extra_msh: &str) -> Message {
    let raw = msg(&[
        &format!(r"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A04|C{v}|P|{v}{extra_msh}"),
        r"PID|1||42^^^CLINIC^MR||DOE^JANE",
    ]);
    Message::parse(&raw).unwrap()
}

fn rejected() -> Outcome {
    Outcome::Rejected(
        ErrCondition::new(
            ErrCondition::REQUIRED_FIELD_MISSING,
            Severity::Error,
            "PID-3 is empty",
        )
        .at(ErrLocation {
            segment: "PID".into(),
            sequence: 1,
            field: 3,
            repetition: None,
            component: None,
        }),
    )
}

#[test]
fn adt_a01_header_and_paths() {
    let m = Message::parse(&adt_a01()).unwrap();
    let h = m.header();
    assert_eq!(h.sending_application, "EPIC");
    assert_eq!(h.sending_facility, "HOSP^1.2.3^ISO");
    assert_eq!(h.namespace(&h.sending_facility), "HOSP");
    assert_eq!(h.receiving_application, "HL7EDGE");
    assert_eq!(h.receiving_facility, "CENTRAL");
    assert_eq!(h.datetime, "20240301120000");
    assert_eq!(h.message_type.code, "ADT");
    assert_eq!(h.message_type.trigger, "A01");
    assert_eq!(h.message_type.structure.as_deref(), Some("ADT_A01"));
    assert_eq!(h.control_id, "MSG00001");
    assert_eq!(h.processing_id, "P");
    assert_eq!(h.version, "2.5.1");
    assert_eq!(h.accept_ack, None);
    assert!(!h.is_enhanced_mode());
    assert_eq!(m.charset(), Charset::UTF8_LENIENT);
    assert_eq!(m.segment_count(), 4);
    let ids: Vec<_> = m.segment_ids().collect();
    assert_eq!(ids, [b"MSH", b"EVN", b"PID", b"PV1"]);

    assert_eq!(text(&m, "MSH-1").as_deref(), Some("|"));
    assert_eq!(text(&m, "MSH-2").as_deref(), Some(r"^~\&"));
    assert_eq!(text(&m, "MSH-3").as_deref(), Some("EPIC"));
    assert_eq!(text(&m, "MSH-9.2").as_deref(), Some("A01"));
    assert_eq!(text(&m, "MSH-4.2").as_deref(), Some("1.2.3"));
    assert_eq!(text(&m, "MSH-2.2"), None);
    assert_eq!(text(&m, "PID-5.1").as_deref(), Some("DOE"));
    assert_eq!(text(&m, "PID-5").as_deref(), Some("DOE^JOHN^Q"));
    assert_eq!(text(&m, "PID-3[2].1").as_deref(), Some("987654320"));
    assert_eq!(text(&m, "PID-3.1").as_deref(), Some("123456"));
    assert_eq!(text(&m, "PID-3[1].4.1").as_deref(), Some("HOSP"));
    assert_eq!(text(&m, "PID-3[1].4.2").as_deref(), Some("1.2.840.1"));
    assert_eq!(text(&m, "PID-3[1].4.9"), None);
    assert_eq!(text(&m, "PID-3[4]"), None);
    assert_eq!(text(&m, "PID-2"), None, "empty field");
    assert_eq!(text(&m, "PID-40"), None, "absent field");
    assert_eq!(text(&m, "PID[2]-3"), None, "absent segment occurrence");
    assert_eq!(text(&m, "OBX-5"), None, "absent segment");
    assert_eq!(text(&m, "PV1-19").as_deref(), Some("V0001"));
    // locate() finds existing empty elements, get() treats them as not valued.
    assert_eq!(m.locate(&path("PID-2")).map(|r| r.len()), Some(0));
    assert_eq!(get(&m, "PID-3[2]"), Some(&b"987654320^^^SSA^SS"[..]));
    assert_eq!(m.raw(), adt_a01().as_slice());
}

#[test]
fn mrns_read_cx_repetitions() {
    let m = Message::parse(&adt_a01()).unwrap();
    let ids = m.mrns();
    assert_eq!(ids.len(), 2, "the repetition without CX.1 is skipped");
    assert_eq!(ids[0].id, "123456");
    assert_eq!(ids[0].check_digit, None);
    assert_eq!(
        ids[0].assigning_authority.as_deref(),
        Some("HOSP&1.2.840.1&ISO")
    );
    assert_eq!(ids[0].identifier_type.as_deref(), Some("MR"));
    assert_eq!(ids[1].id, "987654320");
    assert_eq!(ids[1].identifier_type.as_deref(), Some("SS"));

    let oru = Message::parse(&oru_r01()).unwrap();
    let ids = oru.mrns();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].check_digit.as_deref(), Some("7"));
    assert_eq!(ids[0].assigning_authority.as_deref(), Some("LAB"));

    let no_pid = Message::parse(&msg(&[
        r"MSH|^~\&|A|B|C|D|20240301||ACK|X1|P|2.2",
        r"MSA|AA|Q1",
    ]))
    .unwrap();
    assert!(no_pid.mrns().is_empty());
}

#[test]
fn oru_repeated_segments_and_escapes() {
    let m = Message::parse(&oru_r01()).unwrap();
    assert_eq!(m.header().version, "2.3.1");
    assert_eq!(m.header().message_type.structure, None);
    assert_eq!(text(&m, "OBX-5").as_deref(), Some("7.2"));
    assert_eq!(text(&m, "OBX[2]-5").as_deref(), Some("13.5"));
    assert_eq!(text(&m, "OBX[2]-3.2").as_deref(), Some("Hemoglobin"));
    assert_eq!(text(&m, "OBX[4]-5"), None);
    // \F\ \S\ \T\ \R\ \E\ and hex are translated; \H\ \N\ and the unknown \Zq1\ stay verbatim.
    assert_eq!(
        text(&m, "OBX[3]-5").as_deref(),
        Some(r"a|b^c&d~e\f ABC \H\bold\N\ \Zq1\")
    );
    // get() keeps the escaped bytes.
    assert!(get(&m, "OBX[3]-5").unwrap().starts_with(br"a\F\b"));
}

#[test]
fn orm_and_z_segments() {
    let m = Message::parse(&orm_o01()).unwrap();
    assert_eq!(m.header().message_type.code, "ORM");
    assert_eq!(m.header().message_type.trigger, "O01");
    assert_eq!(text(&m, "ZDS-1.4").as_deref(), Some("DICOM"));
    assert_eq!(text(&m, "ORC-2").as_deref(), Some("ORD777"));
    let ack = ack_str(&m, &Outcome::Accepted).unwrap();
    assert_eq!(
        ack,
        "MSH|^~\\&|RIS|HOSP|EHR|CLINIC|20240301120001+0000||ACK^O01^ACK|ACK0001|P|2.4\rMSA|AA|ORM01\r"
    );
}

#[test]
fn terminators_bom_and_blank_lines_are_tolerated() {
    let cr = adt_a01();
    let base = Message::parse(&cr).unwrap();
    let s = String::from_utf8(cr.clone()).unwrap();
    let variants: Vec<Vec<u8>> = vec![
        s.replace('\r', "\n").into_bytes(),
        s.replace('\r', "\r\n").into_bytes(),
        [&b"\xEF\xBB\xBF"[..], &cr].concat(),
        [&b"\r\n  \n"[..], &cr].concat(),
        s.replace('\r', "\r\r\n\n").into_bytes(),
        s.trim_end_matches('\r').as_bytes().to_vec(),
        [&cr[..], &b"\r\n\r\n"[..]].concat(),
    ];
    for v in variants {
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.raw(), v.as_slice(), "raw bytes kept exactly");
        assert_eq!(m.header(), base.header());
        assert_eq!(m.segment_count(), 4);
        assert_eq!(text(&m, "PV1-19").as_deref(), Some("V0001"));
        assert_eq!(m.mrns(), base.mrns());
    }
    // LF-terminated ADT A04 in v2.3.
    let lf = b"MSH|^~\\&|REG|CLINIC|EHR|HOSP|20240301||ADT^A04|R1|P|2.3\nEVN|A04\nPID|1||9^^^CLINIC^MR||POE^EDGAR\n";
    let m = Message::parse(lf).unwrap();
    assert_eq!(m.header().message_type.trigger, "A04");
    assert_eq!(text(&m, "PID-5.2").as_deref(), Some("EDGAR"));
}

#[test]
fn latin1_charset_decodes_text_but_raw_is_unchanged() {
    let mut raw =
        b"MSH|^~\\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A08^ADT_A01|L1|P|2.5|||||DEU|8859/1\r"
            .to_vec();
    raw.extend_from_slice(b"PID|1||1^^^H^MR||M\xfcller^J\xfcrgen\\X e9\\\\XE9\\\r");
    let m = Message::parse(&raw).unwrap();
    assert_eq!(m.header().charset.as_deref(), Some("8859/1"));
    assert_eq!(m.charset(), Charset::LATIN1);
    assert_eq!(text(&m, "PID-5.1").as_deref(), Some("Müller"));
    // \XE9\ is decoded in the message charset (é in ISO-8859-1); "\X e9\" is malformed.
    assert_eq!(text(&m, "PID-5.2").as_deref(), Some("Jürgen\\X e9\\é"));
    assert_eq!(m.raw(), raw.as_slice());
    // The ACK echoes MSH-18.
    let ack = ack_str(&m, &Outcome::Accepted).unwrap();
    assert!(ack.starts_with("MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240301120001+0000||ACK^A08^ACK|ACK0001|P|2.5||||||8859/1\r"), "{ack}");
}

#[test]
fn truncation_character_v27() {
    let raw = msg(&[
        r"MSH|^~\&#|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01^ADT_A01|T27|P|2.7",
        r"PID|1||42^^^CLINIC^MR||LONGNAM\P\^ANN",
    ]);
    let m = Message::parse(&raw).unwrap();
    assert_eq!(m.delimiters().truncation, Some(b'#'));
    assert_eq!(text(&m, "MSH-2").as_deref(), Some(r"^~\&#"));
    assert_eq!(text(&m, "PID-5.1").as_deref(), Some("LONGNAM#"));
    let ack = ack_str(&m, &rejected()).unwrap();
    assert_eq!(
        ack,
        "MSH|^~\\&#|LAB|HOSP|EHR|CLINIC|20240301120001+0000||ACK^A01^ACK|ACK0001|P|2.7\r\
         MSA|AR|T27\r\
         ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty\r"
    );
}

#[test]
fn other_field_separator() {
    let raw = msg(&[
        r"MSH*^~\&*EHR*CLINIC*LAB*HOSP*20240301**ADT^A01*STAR1*P*2.5",
        r"PID*1**42^^^CLINIC^MR**STAR^PAT|RICK",
    ]);
    let m = Message::parse(&raw).unwrap();
    assert_eq!(m.delimiters().field, b'*');
    assert_eq!(text(&m, "MSH-1").as_deref(), Some("*"));
    assert_eq!(m.header().control_id, "STAR1");
    assert_eq!(text(&m, "PID-5.2").as_deref(), Some("PAT|RICK"));
    let ack = ack_str(&m, &Outcome::Accepted).unwrap();
    assert_eq!(
        ack,
        "MSH*^~\\&*LAB*HOSP*EHR*CLINIC*20240301120001+0000**ACK^A01^ACK*ACK0001*P*2.5\rMSA*AA*STAR1\r"
    );
}

#[test]
fn parse_errors_name_the_failure() {
    let e = |raw: &[u8]| Message::parse(raw).unwrap_err();
    assert_eq!(e(b""), ParseError::Empty);
    assert_eq!(e(b"\xEF\xBB\xBF \r\n"), ParseError::Empty);
    assert_eq!(e(b"PID|1||42\r"), ParseError::MissingMsh);
    assert_eq!(e(b"MSA|AA|1\rMSH|^~\\&|\r"), ParseError::MissingMsh);
    assert!(matches!(
        e(b"MSH"),
        ParseError::BadEncodingCharacters { .. }
    ));
    assert!(matches!(
        e(b"MSH|^~\r"),
        ParseError::BadEncodingCharacters { .. }
    ));
    assert!(matches!(
        e(b"MSH|^~\\&xy|A\r"),
        ParseError::BadEncodingCharacters { .. }
    ));
    assert!(matches!(
        e(b"MSH|^~^&|A\r"),
        ParseError::BadEncodingCharacters { .. }
    ));
    assert!(matches!(
        e(b"MSHA^~\\&A\r"),
        ParseError::BadEncodingCharacters { .. }
    ));
    let base = r"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01|C1|P|2.5";
    assert_eq!(
        e(&msg(&[base, "PID|1", "pid|2"])),
        ParseError::BadSegmentId { segment_index: 3 }
    );
    assert_eq!(
        e(&msg(&[base, "PIDX|1"])),
        ParseError::BadSegmentId { segment_index: 2 }
    );
    assert_eq!(
        e(&msg(&[base, "PI"])),
        ParseError::BadSegmentId { segment_index: 2 }
    );
    let missing = |field, component| ParseError::MissingRequiredField { field, component };
    assert_eq!(
        e(br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||^A01|C1|P|2.5"),
        missing(9, Some(1))
    );
    assert_eq!(
        e(br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT|C1|P|2.5"),
        missing(9, Some(2))
    );
    assert_eq!(
        e(br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01||P|2.5"),
        missing(10, None)
    );
    assert_eq!(
        e(br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01|C1||2.5"),
        missing(11, Some(1))
    );
    assert_eq!(
        e(br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01|C1|P"),
        missing(12, Some(1))
    );
    assert_eq!(
        missing(9, Some(2)).to_string(),
        "required field MSH-9.2 is missing"
    );
    // MSH-7 is optional; an ACK may have no trigger (v2.1/2.2).
    assert!(Message::parse(br"MSH|^~\&|A|B|C|D|||ACK|C1|P|2.2").is_ok());
}

#[test]
fn parse_errors_map_to_table_0357() {
    let c = |e: ParseError| e.hl7_error();
    assert_eq!(c(ParseError::Empty).code, 100);
    assert_eq!(c(ParseError::MissingMsh).code, 100);
    assert_eq!(c(ParseError::BadSegmentId { segment_index: 4 }).code, 100);
    let enc = c(ParseError::BadEncodingCharacters { reason: "x" });
    assert_eq!(enc.code, 102);
    assert_eq!(enc.location, Some(ErrLocation::msh(2, None)));
    let req = c(ParseError::MissingRequiredField {
        field: 10,
        component: None,
    });
    assert_eq!(req.code, 101);
    assert_eq!(req.location, Some(ErrLocation::msh(10, None)));
    assert!(matches!(ParseError::Empty.outcome(), Outcome::Rejected(_)));
}

#[test]
fn debug_never_prints_content() {
    let canary = "CANARYXYZZY";
    let raw = msg(&[
        r"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301|SECRETPW|ADT^A01|DBG1|P|2.5",
        &format!(r"PID|1||{canary}^^^H^MR||{canary}^ANN"),
        &format!("OBX|1|TX|NOTE||{canary}"),
    ]);
    let m = Message::parse(&raw).unwrap();
    let dbg = format!("{m:?} {m:#?} {:?} {:?}", m.mrns(), m.header());
    assert!(!dbg.contains(canary), "{dbg}");
    assert!(!dbg.contains("SECRETPW"), "{dbg}");
    assert!(dbg.contains("DBG1"), "control ID is metadata: {dbg}");

    let mut ack = build_ack(&m, &Outcome::Accepted, &PARAMS).unwrap();
    ack.extend_from_slice(format!("ERR||PID^1^5|103^x^HL70357|E||||{canary}\r").as_bytes());
    let ack = Message::parse(&ack).unwrap();
    let info = ack_info(&ack).unwrap();
    assert_eq!(info.text.as_deref(), Some(canary));
    assert!(!format!("{info:?}").contains(canary));

    let err = Message::parse(&msg(&[r"MSH|^~\&|A|B|C|D|||ADT^A01|C1|P|2.5", canary])).unwrap_err();
    assert!(!format!("{err:?} {err}").contains(canary));
}

#[test]
fn ack_shape_follows_version() {
    // (version, MSH-9 of the ACK, ERR segment for a rejected PID-3, MSA-3 present)
    let cases = [
        (
            "2.1",
            "ACK",
            "ERR|PID^1^3^101&Required field missing&HL70357",
            true,
        ),
        (
            "2.2",
            "ACK",
            "ERR|PID^1^3^101&Required field missing&HL70357",
            true,
        ),
        (
            "2.3",
            "ACK^A04",
            "ERR|PID^1^3^101&Required field missing&HL70357",
            true,
        ),
        (
            "2.3.1",
            "ACK^A04",
            "ERR|PID^1^3^101&Required field missing&HL70357",
            true,
        ),
        (
            "2.4",
            "ACK^A04^ACK",
            "ERR|PID^1^3^101&Required field missing&HL70357",
            true,
        ),
        (
            "2.5",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
        (
            "2.5.1",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
        (
            "2.6",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
        (
            "2.7",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
        (
            "2.8",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
        (
            "banana",
            "ACK^A04^ACK",
            "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty",
            false,
        ),
    ];
    for (v, msh9, err, msa3) in cases {
        let m = with_version(v, "");
        let ok = ack_str(&m, &Outcome::Accepted).unwrap();
        let expect_msh =
            format!("MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240301120001+0000||{msh9}|ACK0001|P|{v}\r");
        assert_eq!(ok, format!("{expect_msh}MSA|AA|C{v}\r"), "{v}");
        let nak = ack_str(&m, &rejected()).unwrap();
        let msa = if msa3 {
            format!("MSA|AR|C{v}|PID-3 is empty\r")
        } else {
            format!("MSA|AR|C{v}\r")
        };
        assert_eq!(nak, format!("{expect_msh}{msa}{err}\r"), "{v}");
        // The ACK we build parses with our own parser and reads back.
        let back = Message::parse(nak.as_bytes()).unwrap();
        let info = ack_info(&back).unwrap();
        assert_eq!(info.code, AckCode::AR);
        assert_eq!(info.control_id, format!("C{v}"));
        assert_eq!(info.err_code, Some(101));
    }
    // AE for a retryable error, with a component location and no location at all.
    let m = with_version("2.5.1", "");
    let err = Outcome::Error(
        ErrCondition::new(
            ErrCondition::APPLICATION_INTERNAL_ERROR,
            Severity::Error,
            "store busy: retry",
        )
        .at(ErrLocation::msh(9, Some(2))),
    );
    let ae = ack_str(&m, &err).unwrap();
    assert!(ae.contains("MSA|AE|C2.5.1\rERR||MSH^1^9^1^2|207^Application internal error^HL70357|E||||store busy: retry\r"), "{ae}");
    let m = with_version("2.3", "");
    let err = Outcome::Error(ErrCondition::new(207, Severity::Error, "x|y\u{e9}\r"));
    let ae = ack_str(&m, &err).unwrap();
    assert!(
        ae.ends_with("MSA|AE|C2.3|x\\F\\y??\rERR|^^^207&Application internal error&HL70357\r"),
        "{ae}"
    );
}

#[test]
fn enhanced_mode_follows_msh15() {
    let err = Outcome::Error(ErrCondition::new(207, Severity::Error, "busy"));
    // (MSH-15, MSH-16, ack on success, ack on error)
    let cases = [
        ("AL", "NE", true, true),
        ("NE", "AL", false, false),
        ("ER", "AL", false, true),
        ("SU", "AL", true, false),
        ("", "AL", true, true),
        ("XX", "", true, true),
    ];
    for (accept, app, on_ok, on_err) in cases {
        let m = with_version("2.5.1", &format!("|||{accept}|{app}"));
        assert!(m.header().is_enhanced_mode());
        let ok = ack_str(&m, &Outcome::Accepted);
        assert_eq!(ok.is_some(), on_ok, "{accept}/{app} success");
        if let Some(ok) = ok {
            assert!(ok.contains("|P|2.5.1|||NE|NE\rMSA|CA|C2.5.1\r"), "{ok}");
        }
        let ko = ack_str(&m, &err);
        assert_eq!(ko.is_some(), on_err, "{accept}/{app} error");
        if let Some(ko) = ko {
            assert!(ko.contains("\rMSA|CE|C2.5.1\rERR||"), "{ko}");
        }
    }
    let m = with_version("2.5.1", "|||AL|NE");
    assert!(ack_str(&m, &rejected()).unwrap().contains("MSA|CR|"));
    assert_eq!(m.header().accept_ack, Some(AckCondition::Always));
    assert_eq!(m.header().app_ack, Some(AckCondition::Never));
    // Enhanced mode with MSH-18: NE/NE then MSH-17 empty and MSH-18 echoed.
    let m = with_version("2.5.1", "|||ER|NE||UNICODE UTF-8");
    let ko = ack_str(&m, &rejected()).unwrap();
    assert!(ko.contains("|P|2.5.1|||NE|NE||UNICODE UTF-8\r"), "{ko}");
}

#[test]
fn nak_for_unparsed_salvages_what_it_can() {
    let raw = msg(&[
        r"MSH|^~\&|EHR|CLINIC|LAB|HOSP|20240301||ADT^A01|BROKEN1|P|2.5",
        "PID|1||42",
        "lowercase|x",
    ]);
    let err = Message::parse(&raw).unwrap_err();
    assert_eq!(err, ParseError::BadSegmentId { segment_index: 3 });
    let nak = String::from_utf8(nak_for_unparsed(&raw, &err, &PARAMS).unwrap()).unwrap();
    assert_eq!(
        nak,
        "MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240301120001+0000||ACK^A01^ACK|ACK0001|P|2.5\r\
         MSA|AR|BROKEN1\r\
         ERR|||100^Segment sequence error^HL70357|E||||segment 3 has an invalid segment ID\r"
    );

    // Missing MSH-12: still answered, in the modern shape, with what is there.
    let raw = b"\xEF\xBB\xBFMSH|^~\\&|EHR|CLINIC|LAB|HOSP|||ADT^A01|NOVER|P\r".to_vec();
    let err = Message::parse(&raw).unwrap_err();
    let nak = String::from_utf8(nak_for_unparsed(&raw, &err, &PARAMS).unwrap()).unwrap();
    assert!(nak.contains("MSA|AR|NOVER\r"), "{nak}");
    assert!(
        nak.contains("ERR||MSH^1^12^1^1|101^Required field missing^HL70357|E||||"),
        "{nak}"
    );

    // Enhanced mode: CR, even when MSH-15 says NE.
    let raw = br"MSH|^~\&|EHR|CLINIC|LAB|HOSP|||ADT^A01||P|2.5|||NE|NE";
    let err = Message::parse(raw).unwrap_err();
    let nak = String::from_utf8(nak_for_unparsed(raw, &err, &PARAMS).unwrap()).unwrap();
    assert!(nak.contains("|||NE|NE\rMSA|CR|\r"), "{nak}");

    // Nothing to salvage: no MSH, bad delimiters, nothing at all.
    for raw in [
        &b""[..],
        b"PID|1||42\r",
        b"MSH",
        b"MSH|^~\r",
        b"\x00\x01garbage",
    ] {
        let err = Message::parse(raw).unwrap_err();
        assert_eq!(nak_for_unparsed(raw, &err, &PARAMS), None, "{raw:?}");
    }
}

#[test]
fn ack_info_reads_upstream_acks() {
    let v23 = Message::parse(&msg(&[
        r"MSH|^~\&|HOSP|CENTRAL|EDGE|CLINIC|20240301||ACK^A01|U1|P|2.3",
        r"MSA|AE|ORIG42|Database busy",
        r"ERR|PID^1^3^207&Application internal error&HL70357",
    ]))
    .unwrap();
    let info = ack_info(&v23).unwrap();
    assert_eq!(info.code, AckCode::AE);
    assert_eq!(info.control_id, "ORIG42");
    assert_eq!(info.text.as_deref(), Some("Database busy"));
    assert_eq!(info.err_code, Some(207));
    assert!(!info.code.is_accept());

    let ca = Message::parse(&msg(&[
        r"MSH|^~\&|HOSP|CENTRAL|EDGE|CLINIC|20240301||ACK^A01^ACK|U2|P|2.6",
        r"MSA|CA|ORIG43",
    ]))
    .unwrap();
    let info = ack_info(&ca).unwrap();
    assert_eq!(
        (info.code, info.text, info.err_code),
        (AckCode::CA, None, None)
    );

    let no_msa = Message::parse(&adt_a01()).unwrap();
    assert!(ack_info(&no_msa).is_none());
    let bad_code = Message::parse(&msg(&[
        r"MSH|^~\&|A|B|C|D|||ACK|U3|P|2.2",
        r"MSA|ZZ|ORIG44",
    ]))
    .unwrap();
    assert!(ack_info(&bad_code).is_none());
}

#[test]
fn escape_builds_values_for_the_message_delimiters() {
    let d = Delimiters::default();
    assert_eq!(escape("a|b^c", &d), r"a\F\b\S\c");
    assert_eq!(&*unescape(escape("x~y&z\\", &d).as_bytes(), &d), b"x~y&z\\");
}

/// Mutated and truncated messages never panic any entry point.
#[test]
fn no_panic_on_mutated_input() {
    let samples = [
        adt_a01(),
        oru_r01(),
        orm_o01(),
        msg(&[
            r"MSH|^~\&#|A|B|C|D|||ADT^A01|T|P|2.7|||ER|AL||8859/1",
            "PID|1||1^2^3^4&5&6^7~8||M\u{fc}^X\\X41\\\\F\\",
        ]),
        b"\xEF\xBB\xBFMSH*^~\\&*A*B*C*D***ACK*Z*P*2.2\nMSA*AE*Q*t\nERR*^^^207&x&HL70357\n".to_vec(),
    ];
    let paths: Vec<FieldPath> = [
        "MSH-1",
        "MSH-2",
        "MSH-2.1",
        "MSH-9.2",
        "MSH-18",
        "PID-3",
        "PID-3[2].4.2",
        "PID-5.1",
        "OBX[2]-5",
        "MSA-2",
        "ERR-1.4.1",
        "ZZZ-65535[65535].65535.65535",
    ]
    .iter()
    .map(|p| path(p))
    .collect();
    let mut exercised = 0usize;
    let mut check = |raw: &[u8]| {
        let err = ErrCondition::new(207, Severity::Error, "x");
        match Message::parse(raw) {
            Ok(m) => {
                exercised += 1;
                for p in &paths {
                    let _ = m.get(p);
                    let _ = m.text(p);
                    let _ = m.locate(p);
                }
                let _ = m.mrns();
                let _ = format!("{m:?}");
                let _ = ack_info(&m);
                for o in [
                    Outcome::Accepted,
                    Outcome::Error(err.clone()),
                    Outcome::Rejected(err),
                ] {
                    if let Some(ack) = build_ack(&m, &o, &PARAMS) {
                        // Our ACKs always parse with our own parser.
                        Message::parse(&ack).unwrap();
                    }
                }
            }
            Err(e) => {
                let _ = e.hl7_error();
                if let Some(nak) = nak_for_unparsed(raw, &e, &PARAMS) {
                    // Salvaged values may be missing, so the NAK itself need not parse.
                    let _ = Message::parse(&nak);
                }
            }
        }
    };
    let replacements = [
        0x00, 0xFF, b'|', b'^', b'~', b'\\', b'&', b'\r', b'\n', b'#', b'*',
    ];
    for s in &samples {
        for len in 0..=s.len() {
            check(&s[..len]);
        }
        for i in 0..s.len() {
            for r in replacements {
                let mut m = s.clone();
                m[i] = r;
                check(&m);
            }
            let mut m = s.clone();
            m.remove(i);
            check(&m);
        }
    }
    assert!(
        exercised > 1000,
        "mutations mostly still parse: {exercised}"
    );
}
