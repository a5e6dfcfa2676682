//! `/debug/pprof/heap`: the heap profile, dumped by whatever the binary handed to the mux.
//!
//! This crate does not pick the allocator: a heap profile needs a profiling allocator
//! (the `gateway` binary runs jemalloc with sampling on), and a library embedder or a test
//! on the default allocator has none, so the view answers 501 there.

use bytes::Bytes;
use http::StatusCode;

use crate::response::DebugResponse;

/// Dumps the live allocations the allocator sampled, as gzip-compressed pprof protobuf
/// (what Go's `/debug/pprof/heap` serves and `go tool pprof` reads). Called on a blocking
/// thread; an error is said in the 500 answer.
pub type HeapProfiler = fn() -> Result<Vec<u8>, String>;

/// Answers with a heap profile from `profiler`, or 501 without one.
pub(crate) async fn serve(profiler: Option<HeapProfiler>) -> DebugResponse {
    let Some(dump) = profiler else {
        return DebugResponse::error(
            StatusCode::NOT_IMPLEMENTED,
            "no heap profiler installed: heap profiles need the gateway binary (jemalloc with profiling); an embedding program can install one with DebugMux::with_heap_profiler",
        );
    };
    match tokio::task::spawn_blocking(dump).await {
        Ok(Ok(profile)) => DebugResponse::new(
            StatusCode::OK,
            "application/octet-stream",
            Bytes::from(profile),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "heap profile failed");
            DebugResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("heap profile: {error}"),
            )
        }
        Err(error) => {
            tracing::error!(%error, "heap profile task failed");
            DebugResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the heap profile task failed: {error}"),
            )
        }
    }
}
