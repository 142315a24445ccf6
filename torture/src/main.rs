//! `cachecoord-torture`: reliability scenarios run from outside, each bounded
//! in time and stopping by itself. Every scenario starts its own redis-server
//! and service instances (this binary in `serve` mode) on free ports of
//! 127.0.0.1, prints a markdown report, and exits non-zero when a check failed.
//!
//! Scenarios: `faults`, `locks`, `budget`, `grpc-fuzz`, `soak`; see
//! RELIABILITY.md for what each checks and its latest figures.

mod budget;
mod cluster;
mod faults;
mod grpc_fuzz;
mod invariants;
mod load;
mod locks;
mod record;
mod soak;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cachecoord-torture", about)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Also append the report to this file.
    #[arg(long, global = true)]
    out: Option<String>,
}

#[derive(Subcommand)]
enum Scenario {
    /// Faults under a steady mixed load, with the rate-limit, Fetch and
    /// InvalidateTags invariants checked throughout (about 2 minutes).
    Faults {
        /// Concurrent callers of the mixed load.
        #[arg(long, default_value_t = 64)]
        callers: usize,
        /// Only these faults (comma-separated names from the report), for a shorter run.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The lock checker: fenced writes to a shared register through two
    /// instances, with service pauses, client pauses, Redis restarts and cut
    /// Hold streams.
    Locks {
        /// How long to run.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Every script at the worst inputs the default limits allow, timed by
    /// Redis's SLOWLOG against the 5 ms budget.
    Budget,
    /// Random and mutated messages to every RPC of the real server.
    GrpcFuzz {
        /// Messages to send.
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
        /// Seed of the random generator (printed, so a failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// A steady load at half the measured maximum for a while: errors, RSS,
    /// Redis keys and memory, and latency over time.
    Soak {
        /// How long to run after warm-up.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        callers: usize,
    },
    /// Run the service (used by the scenarios themselves, in child processes).
    Serve {
        /// cachecoord flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Scenario::Serve { flags } = args.scenario {
        return match serve(flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("serve: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::Faults { callers, only } => {
                let faults: Vec<_> = faults::Fault::ALL
                    .into_iter()
                    .filter(|f| {
                        only.is_empty() || only.iter().any(|o| f.name().to_lowercase().contains(&o.to_lowercase()))
                    })
                    .collect();
                faults::run(callers, &faults).await
            }
            Scenario::Locks { duration } => locks::run(duration).await,
            Scenario::Budget => budget::run().await,
            Scenario::GrpcFuzz { calls, seed } => grpc_fuzz::run(calls, seed.unwrap_or_else(rand::random)).await,
            Scenario::Soak { duration, callers } => soak::run(duration, callers).await,
            Scenario::Serve { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok((report, passed)) => {
            println!("{report}");
            if let Some(path) = args.out {
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{report}\n").as_bytes()));
                if let Err(err) = appended {
                    eprintln!("cannot write {path}: {err}");
                }
            }
            if passed {
                eprintln!("PASSED");
                ExitCode::SUCCESS
            } else {
                eprintln!("FAILED: see the report");
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("the scenario could not run: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The service, in this process, until SIGTERM or SIGINT.
fn serve(flags: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let config = cachecoord::config::Config::try_parse_from(std::iter::once("cachecoord".to_string()).chain(flags))?;
    config.validate()?;
    cachecoord::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        cachecoord::server::run(config, listener, shutdown).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}
