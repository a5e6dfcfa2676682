//! CPU profiles with the `pprof` crate: pprof protobuf (for `go tool pprof`) or an SVG
//! flame graph.
//!
//! The profiler samples the whole process through `SIGPROF`, so only one profile can run at
//! a time in a process: a second request gets 409 at once instead of queueing behind a
//! minute-long profile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use pprof::protos::Message;

use crate::query::Query;
use crate::response::DebugResponse;

/// Profile length when `seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 30;
/// Longest profile a request may ask for.
pub const MAX_SECONDS: u64 = 60;
/// Samples per second (Go's `runtime/pprof` takes 100).
const FREQUENCY: i32 = 100;

/// Set while a profile runs anywhere in this process.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// What to make of the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// pprof protobuf, uncompressed.
    Pprof,
    /// SVG flame graph.
    Flamegraph,
}

/// Why a profile could not be made.
#[derive(Debug, thiserror::Error)]
enum ProfileError {
    /// The profiler failed to start, sample or report.
    #[error("profiler: {0}")]
    Profiler(#[from] pprof::Error),
    /// The request went away before the profile ended.
    #[error("the request went away")]
    Cancelled,
}

/// The process-wide profiling slot; released when dropped.
struct Slot;

impl Slot {
    fn acquire() -> Option<Slot> {
        PROFILING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// `seconds` from the query: default 30, 1 to 60.
fn seconds(query: &Query) -> Result<u64, String> {
    let Some(text) = query.get("seconds") else {
        return Ok(DEFAULT_SECONDS);
    };
    match text.parse::<u64>() {
        Ok(seconds) if (1..=MAX_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "seconds must be a whole number from 1 to {MAX_SECONDS}, got {text:?}"
        )),
    }
}

/// Profiles the process for `?seconds=N` and answers with `output`.
pub(crate) async fn serve(query: &Query, output: Output) -> DebugResponse {
    let seconds = match seconds(query) {
        Ok(seconds) => seconds,
        Err(message) => return DebugResponse::error(StatusCode::BAD_REQUEST, message),
    };
    let Some(slot) = Slot::acquire() else {
        return DebugResponse::error(
            StatusCode::CONFLICT,
            "a CPU profile is already running; try again when it ends",
        );
    };
    // The sampling thread waits on this channel: dropping the sender (the request went
    // away, so this future was dropped) ends the profile early.
    let (stop, stopped) = mpsc::channel::<()>();
    let duration = Duration::from_secs(seconds);
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        record(duration, &stopped, output)
    });
    let result = task.await;
    drop(stop);
    match result {
        Ok(Ok(body)) => match output {
            Output::Pprof => DebugResponse::new(StatusCode::OK, "application/octet-stream", body),
            Output::Flamegraph => DebugResponse::new(StatusCode::OK, "image/svg+xml", body),
        },
        Ok(Err(ProfileError::Profiler(pprof::Error::Running))) => {
            DebugResponse::error(StatusCode::CONFLICT, "the CPU profiler is already running")
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "CPU profile failed");
            DebugResponse::error(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
        Err(error) => {
            tracing::error!(%error, "CPU profile task failed");
            DebugResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the profile task failed: {error}"),
            )
        }
    }
}

/// Samples for `duration` (or until `stopped` is disconnected) on the calling thread.
fn record(
    duration: Duration,
    stopped: &mpsc::Receiver<()>,
    output: Output,
) -> Result<Bytes, ProfileError> {
    // Unwinding through these libraries from a signal handler can deadlock (pprof's advice).
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    if let Err(mpsc::RecvTimeoutError::Disconnected) = stopped.recv_timeout(duration) {
        return Err(ProfileError::Cancelled);
    }
    let report = guard.report().build()?;
    drop(guard);
    match output {
        Output::Pprof => Ok(Bytes::from(report.pprof()?.encode_to_vec())),
        Output::Flamegraph => {
            if report.data.is_empty() {
                return Ok(Bytes::from(empty_flamegraph(duration)));
            }
            let mut options = pprof::flamegraph::Options::default();
            options.title = format!("gateway CPU, {} s", duration.as_secs());
            let mut svg = Vec::new();
            report.flamegraph_with_options(&mut svg, &mut options)?;
            Ok(Bytes::from(svg))
        }
    }
}

/// An idle process takes no CPU samples; say so in a valid SVG rather than an empty body.
fn empty_flamegraph(duration: Duration) -> String {
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="600" height="40">"#,
            r#"<text x="10" y="25" font-family="monospace" font-size="14">"#,
            "no CPU samples in {} s (the gateway was idle)</text></svg>\n"
        ),
        duration.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_default_and_bounds() {
        assert_eq!(seconds(&Query::parse("")), Ok(DEFAULT_SECONDS));
        assert_eq!(seconds(&Query::parse("seconds=1")), Ok(1));
        assert_eq!(seconds(&Query::parse("seconds=60")), Ok(60));
        assert!(seconds(&Query::parse("seconds=0")).is_err());
        assert!(seconds(&Query::parse("seconds=61")).is_err());
        assert!(seconds(&Query::parse("seconds=-1")).is_err());
        assert!(seconds(&Query::parse("seconds=1.5")).is_err());
    }

    #[tokio::test]
    async fn bad_seconds_is_400() {
        let response = serve(&Query::parse("seconds=900"), Output::Pprof).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn empty_flamegraph_is_svg() {
        assert!(empty_flamegraph(Duration::from_secs(2)).starts_with("<svg"));
    }

    /// Two overlapping profiles: one answers, the other is refused at once with 409, and
    /// the slot is free again afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_profile_at_a_time() {
        let query = Query::parse("seconds=1");
        let (first, second) = tokio::join!(
            serve(&query, Output::Pprof),
            serve(&query, Output::Flamegraph)
        );
        let mut statuses = [first.status, second.status];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
        if first.status == StatusCode::OK {
            let profile =
                pprof::protos::Profile::decode(first.body.clone()).expect("pprof protobuf");
            assert!(!profile.sample_type.is_empty());
            assert!(profile.string_table.iter().any(|s| s == "cpu"));
        } else {
            assert!(String::from_utf8_lossy(&second.body).contains("<svg"));
        }
        assert!(!PROFILING.load(Ordering::Acquire));
    }
}
