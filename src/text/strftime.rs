//! `strftime_now(fmt)` for templates (Llama-style templates print today's date with it).
//!
//! Python formats `datetime.now()` in the local time zone; without a time-zone database this
//! uses UTC, which is what servers in containers usually run in. `%Z`/`%z` print nothing, as for
//! Python's naive datetimes.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
    /// 0 = Monday
    pub weekday: u32,
    /// 1..=366
    pub yday: u32,
}

impl DateTime {
    pub fn from_unix(secs: i64, micros: u32) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let start_of_year = days_from_civil(year, 1, 1);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            micros,
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            yday: (days - start_of_year + 1) as u32,
        }
    }

    pub fn now_utc() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::from_unix(
            i64::try_from(now.as_secs()).unwrap_or(i64::MAX / 2),
            now.subsec_micros(),
        )
    }
}

pub(crate) fn strftime_now(format: &str) -> Result<String, String> {
    strftime(&DateTime::now_utc(), format)
}

/// C/glibc `strftime` for the common directives, with glibc's `-` flag (no padding).
pub(crate) fn strftime(t: &DateTime, format: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars
            .next()
            .ok_or_else(|| format!("strftime: format {format:?} ends with '%'"))?;
        let pad = spec != '-';
        if !pad {
            spec = chars
                .next()
                .ok_or_else(|| format!("strftime: format {format:?} ends with '%-'"))?;
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if pad {
                write!(out, "{v:0width$}")
            } else {
                write!(out, "{v}")
            };
        };
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match spec {
            'Y' => num(&mut out, t.year, 4),
            'y' => num(&mut out, t.year.rem_euclid(100), 2),
            'm' => num(&mut out, i64::from(t.month), 2),
            'd' => num(&mut out, i64::from(t.day), 2),
            'e' => {
                let _ = if pad {
                    write!(out, "{:>2}", t.day)
                } else {
                    write!(out, "{}", t.day)
                };
            }
            'H' => num(&mut out, i64::from(t.hour), 2),
            'I' => num(&mut out, i64::from(hour12), 2),
            'M' => num(&mut out, i64::from(t.minute), 2),
            'S' => num(&mut out, i64::from(t.second), 2),
            'f' => num(&mut out, i64::from(t.micros), 6),
            'j' => num(&mut out, i64::from(t.yday), 3),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'A' => out.push_str(DAYS[t.weekday as usize % 7]),
            'a' => out.push_str(&DAYS[t.weekday as usize % 7][..3]),
            'B' => out.push_str(MONTHS[(t.month as usize + 11) % 12]),
            'b' | 'h' => out.push_str(&MONTHS[(t.month as usize + 11) % 12][..3]),
            'u' => num(&mut out, i64::from(t.weekday + 1), 1),
            'w' => num(&mut out, i64::from((t.weekday + 1) % 7), 1),
            'F' => {
                let _ = write!(out, "{:04}-{:02}-{:02}", t.year, t.month, t.day);
            }
            'T' => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            'D' => {
                let _ = write!(
                    out,
                    "{:02}/{:02}/{:02}",
                    t.month,
                    t.day,
                    t.year.rem_euclid(100)
                );
            }
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {:>2} {:02}:{:02}:{:02} {}",
                    &DAYS[t.weekday as usize % 7][..3],
                    &MONTHS[(t.month as usize + 11) % 12][..3],
                    t.day,
                    t.hour,
                    t.minute,
                    t.second,
                    t.year
                );
            }
            'Z' | 'z' => {}
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                // glibc prints unknown conversions as written.
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    Ok(out)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_known_instant() {
        // 2024-02-29T13:05:09Z, a Thursday, day 60 of a leap year.
        let t = DateTime::from_unix(1_709_211_909, 42);
        assert_eq!(
            strftime(&t, "%Y-%m-%d %H:%M:%S.%f %a %A %b %B %j %I%p %e|%-d %y %%").unwrap(),
            "2024-02-29 13:05:09.000042 Thu Thursday Feb February 060 01PM 29|29 24 %"
        );
        assert_eq!(strftime(&t, "%d %b %Y").unwrap(), "29 Feb 2024");
        let epoch = DateTime::from_unix(0, 0);
        assert_eq!(strftime(&epoch, "%c").unwrap(), "Thu Jan  1 00:00:00 1970");
        assert!(strftime(&epoch, "oops %").is_err());
    }
}
