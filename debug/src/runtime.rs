//! `/debug/runtime`: what tokio's stable `RuntimeMetrics` tell about the runtime that
//! serves the request (no `tokio_unstable`, so no per-task list and no poll counts).

use http::StatusCode;
use serde::Serialize;

use crate::response::DebugResponse;

/// The runtime as `/debug/runtime` shows it.
#[derive(Debug, Serialize)]
struct Runtime {
    /// `current_thread` or `multi_thread`.
    flavor: &'static str,
    /// Worker threads.
    workers: usize,
    /// Tasks spawned and not yet finished.
    alive_tasks: usize,
    /// Tasks waiting in the shared (injection) queue.
    global_queue_depth: usize,
    /// One entry per worker (only where the target has 64-bit atomics).
    per_worker: Vec<Worker>,
}

/// One worker's counters since the runtime started.
#[derive(Debug, Serialize)]
struct Worker {
    /// Index of the worker.
    worker: usize,
    /// Times the worker parked (went idle).
    park_count: u64,
    /// Times the worker parked or unparked (odd while it is parked).
    park_unpark_count: u64,
    /// Time spent running tasks, in seconds.
    busy_seconds: f64,
}

/// Answers with the metrics of the current runtime.
pub(crate) fn serve() -> DebugResponse {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return DebugResponse::error(StatusCode::INTERNAL_SERVER_ERROR, "not on a tokio runtime");
    };
    let metrics = handle.metrics();
    let flavor = match handle.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        _ => "multi_thread",
    };
    let workers = metrics.num_workers();
    DebugResponse::ok(&Runtime {
        flavor,
        workers,
        alive_tasks: metrics.num_alive_tasks(),
        global_queue_depth: metrics.global_queue_depth(),
        per_worker: per_worker(&metrics, workers),
    })
}

#[cfg(target_has_atomic = "64")]
fn per_worker(metrics: &tokio::runtime::RuntimeMetrics, workers: usize) -> Vec<Worker> {
    (0..workers)
        .map(|worker| Worker {
            worker,
            park_count: metrics.worker_park_count(worker),
            park_unpark_count: metrics.worker_park_unpark_count(worker),
            busy_seconds: metrics.worker_total_busy_duration(worker).as_secs_f64(),
        })
        .collect()
}

#[cfg(not(target_has_atomic = "64"))]
fn per_worker(_metrics: &tokio::runtime::RuntimeMetrics, _workers: usize) -> Vec<Worker> {
    Vec::new()
}
