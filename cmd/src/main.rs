//! The `gateway` binary: parses flags, sets up logging and signals, runs the gateway.
//!
//! On Unix its allocator is jemalloc with heap profiling: `.cargo/config.toml` sets
//! `JEMALLOC_SYS_WITH_MALLOC_CONF` so jemalloc is built sampling live allocations from the
//! start (one sample per 8 MiB allocated on average), and `/debug/pprof/heap` dumps them
//! through `jemalloc_pprof`.

use std::process::ExitCode;

use clap::Parser;
use cmd::Cli;
use tokio_util::sync::CancellationToken;

#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(cmd::kratos_flags::rewrite(std::env::args_os())) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let text = err.to_string();
            let line = text.lines().next().unwrap_or("bad arguments");
            eprintln!("gateway: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let _log_guard = init_logging();
    let cli = Cli {
        heap_profiler: HEAP_PROFILER,
        ..cli
    };
    if let Some((old, new)) = cmd::limits::raise_open_file_limit() {
        tracing::info!(old, new, "raised the open-file limit to the hard limit");
    }
    // One worker: everything runs on this thread (as an nginx worker process does), with no
    // work-stealing queues and no wake-ups across threads; blocking work still goes to the
    // blocking pool.
    let mut runtime = match cli.workers {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        workers => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(workers) = workers {
                runtime.worker_threads(workers);
            }
            runtime
        }
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("gateway: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    let outcome = runtime.block_on(async move {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining in-flight requests");
            signal_token.cancel();
        });
        cmd::run(cli, shutdown, |_| {}).await
    });
    // Spans still queued by the tracing middleware go to their collectors before exit.
    middleware_builtin::tracing::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gateway: {message}");
            ExitCode::from(2)
        }
    }
}

/// What serves `/debug/pprof/heap`: jemalloc's dump where jemalloc is the allocator.
#[cfg(unix)]
const HEAP_PROFILER: Option<debug::HeapProfiler> = Some(dump_heap_profile);
#[cfg(not(unix))]
const HEAP_PROFILER: Option<debug::HeapProfiler> = None;

/// jemalloc's sampled live allocations as gzipped pprof protobuf (`/debug/pprof/heap`).
/// Runs on a blocking thread, so it may wait for the profiler's lock.
#[cfg(unix)]
fn dump_heap_profile() -> Result<Vec<u8>, String> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(
            "jemalloc heap profiling is off: this binary was built without JEMALLOC_SYS_WITH_MALLOC_CONF=prof:true (see .cargo/config.toml)"
                .to_owned(),
        );
    };
    let mut ctl = ctl.blocking_lock();
    if !ctl.activated() {
        return Err("jemalloc heap profiling is not active (prof_active:false)".to_owned());
    }
    ctl.dump_pprof()
        .map_err(|error| format!("jemalloc profile dump: {error:#}"))
}

/// Logs go to stderr through a background writer, so a slow terminal or pipe never stalls
/// the request path; the returned guard flushes what is pending at exit.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // 16,384 pending lines (a third of a second of access lines at 50k req/s) instead of the
    // default 128,000: the queue's slots are written when it is made, so the default held
    // 4 MiB resident from the start (jemalloc heap profile), a fifth of the idle RSS.
    // Beyond the limit lines are dropped (and counted by tracing-appender), never waited on.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(16_384)
        .lossy(true)
        .finish(std::io::stderr());
    let json = std::env::var("GATEWAY_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_timer(cmd::log_time::LogTime)
        .with_writer(writer);
    if json {
        builder.json().init();
    } else if ansi {
        builder.init();
    } else {
        // Without colours, fields are written as plain `name=value`: the default field
        // formatter wraps every name in a (here empty) ANSI style, which was 6k of the 15k
        // instructions of an access line (callgrind, tests/bench middleware scenario); and
        // `log_fields` writes strings and integers without `core::fmt`.
        builder.fmt_fields(cmd::log_fields::PlainFields).init();
    }
    guard
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
