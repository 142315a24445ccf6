//! The `cachecoord` binary: parse configuration, bind, serve until a signal.

use std::process::ExitCode;

use cachecoord::{
    auth::keyring,
    config::{Command, Config, KeysCommand},
    server, telemetry,
};
use clap::Parser;
use tokio::net::TcpListener;

/// jemalloc: measured ~10% less service CPU per Cache.Get than glibc malloc,
/// at a smaller RSS than mimalloc (BENCHMARKS.md, "Changes tried").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            // One line: clap's first, without its "error: " label.
            let text = err.to_string();
            let line = text.lines().next().unwrap_or_default().trim_start_matches("error: ");
            eprintln!("cachecoord: {line}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Keys(KeysCommand::New { id, tenant, allow })) = &config.command {
        return new_key(id, tenant, allow);
    }
    if let Err(reason) = config.validate() {
        eprintln!("cachecoord: invalid configuration: {reason}");
        return ExitCode::from(2);
    }
    telemetry::init(config.log_format);

    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("cachecoord: cannot listen on {}: {err}", config.listen);
            return ExitCode::from(1);
        }
    };
    tracing::info!(listen = %config.listen, redis = %config.redacted_redis_url(), "cachecoord serving");
    if let Err(err) = server::run(config, listener, shutdown_signal()).await {
        tracing::error!(%err, "server failed");
        return ExitCode::from(1);
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// `cachecoord keys new`: the key on stderr, its keys-file entry on stdout.
fn new_key(id: &str, tenant: &str, allow: &[String]) -> ExitCode {
    match keyring::entry(id, tenant, allow) {
        Ok((key, entry)) => {
            eprintln!("API key {id:?} (shown only now; give it to the caller):\n{key}");
            print!("{entry}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("cachecoord: {reason}");
            ExitCode::from(2)
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return interrupt.await.unwrap_or_default(),
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
