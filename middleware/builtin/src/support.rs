//! Helpers shared by the built-in middlewares: option decoding that names the field,
//! lenient number and duration fields as Kratos files write them, optional denial counts.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use middleware::BuildError;
use middleware::denials::DenialCounter;

/// Decodes `config.options` into `T`, naming the option field on error (the middleware
/// API's decoder, under the name the built-ins use).
pub use middleware::options as decode;

/// An error about option `field` of middleware `name`.
pub fn option_error(name: &str, field: &str, message: impl fmt::Display) -> BuildError {
    BuildError::new(name, format!("options.{field}: {message}"))
}

/// Where a built-in counts the requests it refuses: a [`DenialCounter`], or nothing when it
/// was built without one. Unlike the bare counter it shows in `Debug` output.
#[derive(Clone, Default)]
pub struct Denied(Option<DenialCounter>);

impl Denied {
    /// Counts in `counter`.
    pub fn new(counter: DenialCounter) -> Self {
        Self(Some(counter))
    }

    /// Adds one refused request.
    pub fn inc(&self) {
        if let Some(counter) = &self.0 {
            counter.inc();
        }
    }
}

impl fmt::Debug for Denied {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.0.is_some() {
            "counted"
        } else {
            "not counted"
        };
        write!(formatter, "Denied({state})")
    }
}

/// `deserialize_with` for a duration written as Go/protojson text (`"1s"`, `"250ms"`).
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    configs::parse_duration(&text).map_err(de::Error::custom)
}

/// `deserialize_with` for an optional duration.
pub fn opt_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|text| configs::parse_duration(&text).map_err(de::Error::custom))
        .transpose()
}

/// `deserialize_with` for an unsigned integer written as a number or a string (`10`, `"10"`).
pub fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(NumberVisitor::<u64>(PhantomData))
}

/// `deserialize_with` for a number written as a number or a string (`2.5`, `"2.5"`).
pub fn lenient_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    deserializer.deserialize_any(NumberVisitor::<f64>(PhantomData))
}

struct NumberVisitor<T>(PhantomData<T>);

trait FromNumber: Sized + std::str::FromStr {
    const EXPECTING: &'static str;
    fn from_u64(value: u64) -> Option<Self>;
    fn from_i64(value: i64) -> Option<Self>;
    fn from_f64(value: f64) -> Option<Self>;
}

impl FromNumber for u64 {
    const EXPECTING: &'static str = "a non-negative integer (number or string)";
    fn from_u64(value: u64) -> Option<Self> {
        Some(value)
    }
    fn from_i64(value: i64) -> Option<Self> {
        u64::try_from(value).ok()
    }
    fn from_f64(value: f64) -> Option<Self> {
        let integral = value.fract() == 0.0 && value >= 0.0 && value <= u64::MAX as f64;
        integral.then_some(value as u64)
    }
}

impl FromNumber for f64 {
    const EXPECTING: &'static str = "a number (or a string holding one)";
    fn from_u64(value: u64) -> Option<Self> {
        Some(value as f64)
    }
    fn from_i64(value: i64) -> Option<Self> {
        Some(value as f64)
    }
    fn from_f64(value: f64) -> Option<Self> {
        value.is_finite().then_some(value)
    }
}

impl<T: FromNumber> Visitor<'_> for NumberVisitor<T> {
    type Value = T;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(T::EXPECTING)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        T::from_u64(value).ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(value), &self))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        T::from_i64(value).ok_or_else(|| E::invalid_value(de::Unexpected::Signed(value), &self))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
        T::from_f64(value).ok_or_else(|| E::invalid_value(de::Unexpected::Float(value), &self))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        value
            .trim()
            .parse()
            .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
    }
}

/// A string or a list of strings (Kratos options accept both).
pub fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;

    impl<'de> de::Visitor<'de> for OneOrMany {
        type Value = Vec<String>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a string or a list of strings")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(vec![value.to_owned()])
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut values = Vec::new();
            while let Some(value) = seq.next_element::<String>()? {
                values.push(value);
            }
            Ok(values)
        }
    }

    deserializer.deserialize_any(OneOrMany)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase", default)]
    struct Sample {
        #[serde(deserialize_with = "lenient_u64")]
        max_keys: u64,
        #[serde(deserialize_with = "duration")]
        window: Duration,
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        flag: bool,
    }

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "sample".into(),
            options,
            required: false,
        }
    }

    #[test]
    fn numbers_and_durations_in_kratos_forms() {
        let sample: Sample = decode(&entry(
            serde_json::json!({"@type": "x", "maxKeys": "10", "window": "1.5s"}),
        ))
        .expect("decodes");
        assert_eq!(sample.max_keys, 10);
        assert_eq!(sample.window, Duration::from_millis(1500));
        let sample: Sample = decode(&entry(serde_json::Value::Null)).expect("defaults");
        assert_eq!(sample.max_keys, 0);
    }

    #[test]
    fn errors_name_the_middleware_and_the_field() {
        let err = decode::<Sample>(&entry(serde_json::json!({"maxKeys": "ten"}))).expect_err("bad");
        assert!(
            err.to_string()
                .starts_with("middleware sample: options.maxKeys: invalid value"),
            "{err}"
        );
        let err = decode::<Sample>(&entry(serde_json::json!({"window": "1x"}))).expect_err("bad");
        assert!(
            err.to_string().contains("options.window: unknown unit"),
            "{err}"
        );
        let err =
            decode::<Sample>(&entry(serde_json::json!({"inner": {"flg": true}}))).expect_err("bad");
        assert!(
            err.to_string()
                .contains("options.inner.flg: unknown field `flg`"),
            "{err}"
        );
        let err = decode::<Sample>(&entry(serde_json::json!({"maxKey": 1}))).expect_err("bad");
        assert!(
            err.to_string()
                .contains("options.maxKey: unknown field `maxKey`"),
            "{err}"
        );
        let err = decode::<Sample>(&entry(serde_json::json!({"inner": {"flag": "yes"}})))
            .expect_err("bad");
        assert!(
            err.to_string().contains("options.inner.flag: invalid type"),
            "{err}"
        );
    }
}
