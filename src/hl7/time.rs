//! HL7 timestamps for the messages we write, without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYYMMDDHHMMSS+0000` in UTC (an HL7 DTM with offset). Times before 1970 are written as the
/// epoch; the clock is ours, not a peer's.
pub fn hl7_timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> String {
        hl7_timestamp(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn known_instants() {
        assert_eq!(at(0), "19700101000000+0000");
        assert_eq!(at(951_782_400), "20000229000000+0000");
        assert_eq!(at(1_709_164_799), "20240228235959+0000");
        assert_eq!(at(1_709_251_200), "20240301000000+0000");
        assert_eq!(at(4_102_444_800), "21000101000000+0000");
        assert_eq!(
            hl7_timestamp(UNIX_EPOCH - Duration::from_secs(5)),
            "19700101000000+0000"
        );
    }
}
