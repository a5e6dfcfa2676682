//! Go-style durations: `parse_duration` reads what Go's `time.ParseDuration` and protojson's
//! `google.protobuf.Duration` write, `format_duration` writes what Go's `Duration.String` does.

use std::fmt;
use std::time::Duration;

/// Largest duration Go can represent (`math.MaxInt64` nanoseconds); longer values are rejected
/// so a file that loads here also loads in go-kratos/gateway.
const MAX_NANOS: u128 = i64::MAX as u128;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string was empty.
    #[error("empty duration")]
    Empty,
    /// The string is not a sequence of `<number><unit>` (for example `"1x"`, `"s"`, `"1"`).
    #[error(
        "invalid duration {0:?}: expected a number with a unit such as \"1s\", \"250ms\", \"1m30s\""
    )]
    Invalid(String),
    /// A component used a unit other than `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`.
    #[error("unknown unit {unit:?} in duration {input:?} (valid units: ns, us, µs, ms, s, m, h)")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole input.
        input: String,
    },
    /// The duration starts with `-`; timeouts cannot be negative.
    #[error("negative duration {0:?}")]
    Negative(String),
    /// The duration exceeds Go's limit of about 292 years.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a Go duration (`"1s"`, `"0.1s"`, `"250ms"`, `"1m30s"`, `"1h"`, `"100us"`, `"100µs"`,
/// `"10ns"`, `"0"`); protojson durations (`"1.5s"`) are a subset of it.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());
    let (negative, mut rest) = match input.strip_prefix('-') {
        Some(unsigned) => (true, unsigned),
        None => (false, input.strip_prefix('+').unwrap_or(input)),
    };
    if rest.is_empty() {
        return Err(if input.is_empty() {
            DurationError::Empty
        } else {
            invalid()
        });
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }

    let mut total: u128 = 0;
    while !rest.is_empty() {
        // The number: digits, optionally a '.', optionally more digits; at least one digit.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_number) = match after_int.strip_prefix('.') {
            Some(after_dot) => {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                after_dot.split_at(frac_len)
            }
            None => ("", after_int),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }

        // The unit: everything up to the next digit or '.'.
        let unit_len = after_number
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        if unit.is_empty() {
            return Err(invalid());
        }
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            // Go accepts U+00B5 (micro sign) and U+03BC (Greek small letter mu).
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    unit: unit.to_owned(),
                    input: input.to_owned(),
                });
            }
        };

        let overflow = || DurationError::Overflow(input.to_owned());
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut component = whole.checked_mul(unit_nanos).ok_or_else(overflow)?;
        // Fraction: keep as many digits as can matter (unit_nanos has at most 13 digits),
        // truncating the rest like Go does.
        let mut scale: u128 = 1;
        let mut fraction: u128 = 0;
        for digit in frac_part.bytes().take(20) {
            fraction = fraction * 10 + u128::from(digit - b'0');
            scale *= 10;
        }
        component += fraction * unit_nanos / scale;
        total = total.checked_add(component).ok_or_else(overflow)?;
        if total > MAX_NANOS {
            return Err(overflow());
        }
        rest = after_unit;
    }

    // "-0s" is still zero in Go; anything else below zero cannot be a timeout.
    if negative && total > 0 {
        return Err(DurationError::Negative(input.to_owned()));
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    // The remainder is below 10^9, so it always fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration the way Go's `time.Duration.String` does: `"1s"`, `"300ms"`,
/// `"1m30s"`, `"1h0m0s"`, `"1.5µs"`, `"0s"`. `parse_duration` reads the result back exactly.
pub fn format_duration(duration: Duration) -> String {
    GoDuration(duration).to_string()
}

/// Display adapter for [`format_duration`].
struct GoDuration(Duration);

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.0.as_nanos();
        if total == 0 {
            return f.write_str("0s");
        }
        if total < 1_000_000_000 {
            let (unit_nanos, unit) = if total < 1_000 {
                (1, "ns")
            } else if total < 1_000_000 {
                (1_000, "\u{b5}s")
            } else {
                (1_000_000, "ms")
            };
            write_fraction(f, total, unit_nanos)?;
            return f.write_str(unit);
        }
        let hours = total / 3_600_000_000_000;
        let minutes = (total / 60_000_000_000) % 60;
        let second_nanos = total % 60_000_000_000;
        if hours > 0 {
            write!(f, "{hours}h{minutes}m")?;
        } else if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write_fraction(f, second_nanos, 1_000_000_000)?;
        f.write_str("s")
    }
}

/// Writes `value / unit` with the fractional digits it needs and no trailing zeros.
fn write_fraction(f: &mut fmt::Formatter<'_>, value: u128, unit: u128) -> fmt::Result {
    let whole = value / unit;
    let mut fraction = value % unit;
    if fraction == 0 {
        return write!(f, "{whole}");
    }
    let mut width = unit.ilog10() as usize;
    while fraction.is_multiple_of(10) {
        fraction /= 10;
        width -= 1;
    }
    write!(f, "{whole}.{fraction:0width$}")
}

/// Serde helpers for `Option<Duration>` fields written as Go duration strings.
pub(crate) mod serde_opt {
    use super::{format_duration, parse_duration};
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;
    use std::fmt;
    use std::time::Duration;

    /// Writes `Some(d)` as `"1s"`-style text and `None` as null.
    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_str(&format_duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a duration string (or null, meaning unset).
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        deserializer.deserialize_option(OptionalDurationVisitor)
    }

    struct OptionalDurationVisitor;

    impl<'de> Visitor<'de> for OptionalDurationVisitor {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"1s\", \"0.5s\" or \"250ms\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(self)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            parse_duration(text).map(Some).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_go_and_protojson_durations() {
        let table: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("1s", Duration::from_secs(1)),
            ("+1s", Duration::from_secs(1)),
            ("0.1s", ms(100)),
            (".5s", ms(500)),
            ("1.s", Duration::from_secs(1)),
            ("1.5s", ms(1500)),
            ("250ms", ms(250)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("100us", Duration::from_micros(100)),
            ("100\u{b5}s", Duration::from_micros(100)),
            ("100\u{3bc}s", Duration::from_micros(100)),
            ("10ns", Duration::from_nanos(10)),
            ("1.000000001s", Duration::new(1, 1)),
            ("0.3333333333s", Duration::from_nanos(333_333_333)),
            ("2562047h", Duration::from_secs(2_562_047 * 3600)),
        ];
        for (input, want) in table {
            assert_eq!(parse_duration(input).as_ref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_bad_durations() {
        let table: &[(&str, DurationError)] = &[
            ("", DurationError::Empty),
            ("1", DurationError::Invalid("1".into())),
            ("s", DurationError::Invalid("s".into())),
            (".s", DurationError::Invalid(".s".into())),
            ("1.2.3s", DurationError::Invalid("1.2.3s".into())),
            ("+", DurationError::Invalid("+".into())),
            ("-1s", DurationError::Negative("-1s".into())),
            (
                "1 s",
                DurationError::UnknownUnit {
                    unit: " s".into(),
                    input: "1 s".into(),
                },
            ),
            (
                "1x",
                DurationError::UnknownUnit {
                    unit: "x".into(),
                    input: "1x".into(),
                },
            ),
            (
                "1sec",
                DurationError::UnknownUnit {
                    unit: "sec".into(),
                    input: "1sec".into(),
                },
            ),
            ("2562048h", DurationError::Overflow("2562048h".into())),
            (
                "99999999999999999999999999999999999999999h",
                DurationError::Overflow("99999999999999999999999999999999999999999h".into()),
            ),
        ];
        for (input, want) in table {
            assert_eq!(parse_duration(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn formats_like_go() {
        let table: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(10), "10ns"),
            (Duration::from_nanos(1_500), "1.5\u{b5}s"),
            (ms(300), "300ms"),
            (Duration::from_micros(1_250), "1.25ms"),
            (Duration::from_secs(1), "1s"),
            (ms(1_500), "1.5s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3_600), "1h0m0s"),
            (Duration::new(3_723, 1), "1h2m3.000000001s"),
        ];
        for (duration, want) in table {
            assert_eq!(format_duration(*duration), *want);
        }
    }

    /// Fuzz-style: arbitrary strings over the duration alphabet never panic, and whatever
    /// parses formats back to text that parses to the same value.
    #[test]
    fn arbitrary_input_never_panics() {
        let alphabet: Vec<char> = "0123456789..+-nsuµμmh x".chars().collect();
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..50_000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut bits = state;
            for _ in 0..(bits % 14) {
                bits = bits.rotate_right(5) ^ 0x9E37_79B9;
                text.push(alphabet[(bits % alphabet.len() as u64) as usize]);
            }
            if let Ok(duration) = parse_duration(&text) {
                assert_eq!(
                    parse_duration(&format_duration(duration)),
                    Ok(duration),
                    "{text}"
                );
            }
        }
        let long = "9".repeat(100) + "h";
        assert!(matches!(
            parse_duration(&long),
            Err(DurationError::Overflow(_))
        ));
    }

    /// Property: every duration Go can represent formats to text that parses back to itself,
    /// and every generated `<n><unit>` string parses to `n * unit`.
    #[test]
    fn format_then_parse_round_trips() {
        // A small deterministic generator (xorshift) keeps the test reproducible.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let units: [(&str, u64); 6] = [
            ("ns", 1),
            ("us", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ];
        for round in 0..20_000 {
            // Spread values over every magnitude, not just the large ones.
            let nanos = (next() % (i64::MAX as u64)) >> (round % 63);
            let duration = Duration::from_nanos(nanos);
            let text = format_duration(duration);
            assert_eq!(parse_duration(&text), Ok(duration), "{text}");

            let (unit, unit_nanos) = units[(next() % 6) as usize];
            let count = next() % 100_000;
            let text = format!("{count}{unit}");
            assert_eq!(
                parse_duration(&text),
                Ok(Duration::from_nanos(count * unit_nanos)),
                "{text}"
            );
        }
    }
}
