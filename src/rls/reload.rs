//! Keeps the rate-limit rules current: re-reads the config on SIGHUP and when
//! its files change, and keeps the rules in force when the new files are bad.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    Rules,
    config::{ConfigErrors, Source, parse, read_sources},
};

/// Loads the rules from `paths` now (an error stops start-up), then keeps
/// them current in a task: on SIGHUP, and when the files' contents change
/// (checked every `poll`; zero checks only on SIGHUP). The task ends when
/// every receiver is gone.
pub fn watch(paths: Vec<PathBuf>, poll: Duration) -> Result<watch::Receiver<Arc<Rules>>, ConfigErrors> {
    let sources = read_sources(&paths)?;
    let rules = parse(&sources)?;
    log_loaded(&rules, &paths);
    let (tx, rx) = watch::channel(Arc::new(rules));
    // Registered here, before returning, so a SIGHUP sent once the server is
    // up never meets the default action (which ends the process).
    let hangup = hangup();
    tokio::spawn(keep_current(tx, paths, poll, sources, hangup));
    Ok(rx)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup()).map_err(|err| tracing::warn!(%err, "no SIGHUP reload")).ok()
}

#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

/// Resolves at the next SIGHUP; never without a handler.
async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup
        && signal.recv().await.is_some()
    {
        return;
    }
    let _ = hangup;
    std::future::pending::<()>().await;
}

async fn keep_current(
    tx: watch::Sender<Arc<Rules>>,
    paths: Vec<PathBuf>,
    poll: Duration,
    mut last: Vec<Source>,
    mut hangup: Hangup,
) {
    // The last read failure logged, so a missing file is logged once, not every poll.
    let mut last_failure: Option<ConfigErrors> = None;
    loop {
        let forced = tokio::select! {
            () = tx.closed() => return,
            () = next_hangup(&mut hangup) => true,
            () = tokio::time::sleep(poll), if !poll.is_zero() => false,
        };
        let sources = match read_sources(&paths) {
            Ok(sources) => sources,
            Err(errors) => {
                if forced || last_failure.as_ref() != Some(&errors) {
                    log_rejected(&errors);
                }
                last_failure = Some(errors);
                continue;
            }
        };
        last_failure = None;
        if !forced && sources == last {
            continue;
        }
        match parse(&sources) {
            Ok(rules) => {
                log_loaded(&rules, &paths);
                tx.send_replace(Arc::new(rules));
            }
            Err(errors) => log_rejected(&errors),
        }
        // A bad file is reported once per change (or SIGHUP), not every poll.
        last = sources;
    }
}

fn log_loaded(rules: &Rules, paths: &[PathBuf]) {
    let (domains, limits) = rules.size();
    tracing::info!(domains, limits, files = ?paths, "rate limit config loaded");
}

fn log_rejected(errors: &ConfigErrors) {
    for error in &errors.0 {
        tracing::error!(%error, "rate limit config rejected; the previous one stays in force");
    }
}
