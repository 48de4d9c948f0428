//! Times in API answers, for `#[serde(serialize_with = ...)]`: the text chrono's own `Serialize`
//! writes for a `DateTime<Utc>` (RFC 3339 in UTC with `Z`, the fraction as short as is exact:
//! none, 3, 6 or 9 digits), written digit by digit into a buffer instead of through
//! `core::fmt` and serde's `collect_str`, which cost about 0.3 µs a time: a 50-record page of
//! keys holds 150 of them. Years outside 0000-9999 and leap seconds take chrono's own path.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;

/// Longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 30;

/// `t` as chrono's `Serialize` would write it.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    match write(t, &mut buf) {
        Some(text) => serializer.serialize_str(text),
        None => serializer.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// An optional time: `null`, or the time as [`serialize`] writes it.
pub fn serialize_option<S: Serializer>(t: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, serializer),
        None => serializer.serialize_none(),
    }
}

/// The text into `buf`, or `None` where chrono's path must write it.
fn write<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; MAX_LEN]) -> Option<&'b str> {
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    let mut text = Text { buf, len: 0 };
    text.digits(4, year.unsigned_abs());
    text.push(b'-');
    text.digits(2, t.month());
    text.push(b'-');
    text.digits(2, t.day());
    text.push(b'T');
    text.digits(2, t.hour());
    text.push(b':');
    text.digits(2, t.minute());
    text.push(b':');
    text.digits(2, t.second());
    // SecondsFormat::AutoSi: the shortest of none, milli, micro and nano that is exact.
    if nanos != 0 {
        text.push(b'.');
        if nanos % 1_000_000 == 0 {
            text.digits(3, nanos / 1_000_000);
        } else if nanos % 1_000 == 0 {
            text.digits(6, nanos / 1_000);
        } else {
            text.digits(9, nanos);
        }
    }
    text.push(b'Z');
    let Text { buf, len } = text;
    std::str::from_utf8(&buf[..len]).ok()
}

struct Text<'b> {
    buf: &'b mut [u8; MAX_LEN],
    len: usize,
}

impl Text<'_> {
    fn push(&mut self, c: u8) {
        self.buf[self.len] = c;
        self.len += 1;
    }

    /// `value`'s last `width` decimal digits, zero-padded.
    fn digits(&mut self, width: usize, mut value: u32) {
        for slot in self.buf[self.len..self.len + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use serde::Serialize;

    use super::*;

    #[derive(Serialize)]
    struct Ours(#[serde(serialize_with = "serialize")] DateTime<Utc>);

    #[derive(Serialize)]
    struct OursOption(#[serde(serialize_with = "serialize_option")] Option<DateTime<Utc>>);

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, nanos: u32) -> DateTime<Utc> {
        Utc.from_utc_datetime(&NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_nano_opt(h, mi, s, nanos).unwrap())
    }

    #[test]
    fn times_are_written_as_chronos_serde_writes_them() {
        let mut times = vec![
            at(2026, 11, 23, 10, 0, 0, 0),
            at(2026, 1, 2, 3, 4, 5, 120_000_000),
            at(2026, 1, 2, 3, 4, 5, 123_456_000),
            at(2026, 1, 2, 3, 4, 5, 1_000),
            at(2026, 1, 2, 3, 4, 5, 7),
            at(2026, 12, 31, 23, 59, 59, 999_999_999),
            at(0, 1, 1, 0, 0, 0, 0),
            at(9999, 12, 31, 23, 59, 59, 1),
            at(10000, 1, 1, 0, 0, 0, 0),
            at(-1, 6, 15, 12, 0, 0, 500_000_000),
            // A leap second, which chrono writes as :60.
            at(2016, 12, 31, 23, 59, 59, 1_500_000_000),
            Utc::now(),
        ];
        // A spread of instants from 1938 to 2191, with every fraction length (the years at the
        // edges are in the list above).
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = x.rem_euclid(8_000_000_000) - 1_000_000_000;
            let nanos = match x.rem_euclid(4) {
                0 => 0,
                1 => (x.rem_euclid(1_000) as u32) * 1_000_000,
                2 => (x.rem_euclid(1_000_000) as u32) * 1_000,
                _ => x.rem_euclid(1_000_000_000) as u32,
            };
            times.push(Utc.timestamp_opt(secs, nanos).unwrap());
        }
        for t in times {
            let chrono = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::to_string(&Ours(t)).unwrap(), chrono, "{t:?}");
            assert_eq!(serde_json::to_string(&OursOption(Some(t))).unwrap(), chrono, "{t:?}");
        }
        assert_eq!(serde_json::to_string(&OursOption(None)).unwrap(), "null");
    }
}
