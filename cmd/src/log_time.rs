//! The timestamp of log lines, as tracing-subscriber's default writes it
//! (`2024-05-06T07:08:09.123456Z`), with the part up to the second formatted once per
//! second per thread. The default timer formats the whole date on every line: 2.4k of the
//! ~10k instructions of an access line (callgrind, tests/bench middleware scenario).

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// UTC, microseconds, as tracing-subscriber's `SystemTime` timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogTime;

thread_local! {
    /// The second last formatted on this thread and its text without the `Z`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl LogTime {
    fn write(since_epoch: Duration, writer: &mut impl fmt::Write) -> fmt::Result {
        let secs = since_epoch.as_secs();
        SECOND.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != secs {
                let text =
                    crate::store::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
                cached.1 = text.trim_end_matches('Z').to_owned();
                cached.0 = secs;
            }
            writer.write_str(&cached.1)
        })?;
        let mut fraction = *b".000000Z";
        let mut micros = since_epoch.subsec_micros();
        for digit in fraction[1..7].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        writer.write_str(std::str::from_utf8(&fraction).map_err(|_| fmt::Error)?)
    }
}

impl FormatTime for LogTime {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self::write(since_epoch, writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(since_epoch: Duration) -> String {
        let mut out = String::new();
        LogTime::write(since_epoch, &mut out).unwrap();
        out
    }

    #[test]
    fn writes_what_the_default_timer_writes() {
        let t = Duration::new(1_735_689_599, 7_654_321);
        assert_eq!(text(t), "2024-12-31T23:59:59.007654Z");
        // The cached second is replaced when the second changes.
        assert_eq!(
            text(t + Duration::from_secs(1)),
            "2025-01-01T00:00:00.007654Z"
        );
        assert_eq!(
            text(Duration::new(0, 999_999_999)),
            "1970-01-01T00:00:00.999999Z"
        );
    }
}
