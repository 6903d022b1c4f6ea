//! Synthetic sample messages (no real patient data) for the demo and the benchmark.

/// The demo's messages, each with a label saying what it shows.
pub fn demo_messages() -> Vec<(&'static str, String)> {
    let adt = "MSH|^~\\&|EPIC|NORTHCLINIC|HL7EDGE|CENTRALHOSP|20261203101500||ADT^A01^ADT_A01|DEMO0001|P|2.5.1\r\
EVN|A01|20261203101500\r\
PID|1||MRN100001^^^NORTHCLINIC^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701\r\
PV1|1|I|WARD1^101^A||||1234^WELBY^MARCUS\r"
        .to_string();
    vec![
        ("ADT^A01 v2.5.1 (admit)", adt.clone()),
        (
            "ORU^R01 v2.5 (lab result)",
            "MSH|^~\\&|LABSYS|NORTHCLINIC|HL7EDGE|CENTRALHOSP|20261203101600||ORU^R01^ORU_R01|DEMO0002|P|2.5\r\
PID|1||MRN100001^^^NORTHCLINIC^MR||DOE^JANE\r\
OBR|1|ORD1|FIL1|2345-7^GLUCOSE^LN\r\
OBX|1|NM|2345-7^GLUCOSE^LN||95|mg/dL|70-99|N|||F\r"
                .to_string(),
        ),
        (
            "ORM^O01 v2.3 (order), enhanced mode asking for an accept ACK (MSH-15 AL)",
            "MSH|^~\\&|EHR|NORTHCLINIC|HL7EDGE|CENTRALHOSP|20261203101700||ORM^O01|DEMO0003|P|2.3|||AL|NE\r\
PID|1||MRN100002^^^NORTHCLINIC^MR||ROE^RICHARD\r\
ORC|NW|ORD2\r\
OBR|1|ORD2||71020^CHEST XRAY^CPT\r"
                .to_string(),
        ),
        ("the same ADT^A01 again (duplicate: acknowledged, stored once)", adt),
        (
            "a message without MSH-9 (rejected with AR and an ERR segment)",
            "MSH|^~\\&|EHR|NORTHCLINIC|HL7EDGE|CENTRALHOSP|20261203101800|||DEMO0004|P|2.5.1\r\
PID|1||MRN100003^^^NORTHCLINIC^MR||POE^EDGAR\r"
                .to_string(),
        ),
    ]
}

/// A realistic ADT^A01 of about 1 KB with the given control ID, for the benchmark.
pub fn adt_1k(control_id: &str) -> Vec<u8> {
    let mut m = format!(
        "MSH|^~\\&|EPIC|NORTHCLINIC|HL7EDGE|CENTRALHOSP|20261203101500||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
EVN|A01|20261203101500|||OPS01^OPERATOR^OLIVIA\r\
PID|1||MRN100001^^^NORTHCLINIC^MR~999-00-1234^^^SSA^SS||DOE^JANE^QUINN^^MS||19800101|F|||1 MAIN ST^APT 4^SPRINGFIELD^IL^62701^USA||(217)555-0100^PRN^PH|(217)555-0199^WPN^PH|EN|M|CAT|ACCT000123456|999-00-1234\r\
NK1|1|DOE^JOHN|SPO^SPOUSE|1 MAIN ST^APT 4^SPRINGFIELD^IL^62701|(217)555-0101\r\
PV1|1|I|WARD1^101^A^NORTHCLINIC||||1234^WELBY^MARCUS^^^DR|5678^KILDARE^JAMES^^^DR||MED||||7|||1234^WELBY^MARCUS^^^DR|IN||SELF|||||||||||||||||||NORTHCLINIC|||||20261203101500\r\
AL1|1|DA|PCN^PENICILLIN^RXNORM|SV|HIVES\r\
DG1|1|I10|R07.9^CHEST PAIN UNSPECIFIED^I10|||A\r\
IN1|1|PLAN01|INS01|ACME HEALTH^^^^^|PO BOX 1^^SPRINGFIELD^IL^62701||(800)555-0000|GRP1000|||||||||DOE^JANE|SEL|19800101\r"
    )
    .into_bytes();
    while m.len() < 1000 {
        m.extend_from_slice(b"ZPD|1|PADDING TO REACH ONE KILOBYTE\r");
    }
    m
}
