//! The `gateway` binary: parses flags, sets up logging and signals, runs the gateway.

use std::process::ExitCode;

use clap::Parser;
use cmd::Cli;
use tokio_util::sync::CancellationToken;

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
    if let Some((old, new)) = cmd::limits::raise_open_file_limit() {
        tracing::info!(old, new, "raised the open-file limit to the hard limit");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.workers {
        runtime.worker_threads(workers.max(1));
    }
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

/// Logs go to stderr through a background writer, so a slow terminal or pipe never stalls
/// the request path; the returned guard flushes what is pending at exit.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let json = std::env::var("GATEWAY_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.init();
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
