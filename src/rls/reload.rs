//! Keeps the rate-limit rules current: re-reads the config on SIGHUP and when
//! its files change, and keeps the rules in force when the new files are bad.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    Rules,
    config::{ConfigErrors, parse, read_sources},
};

/// Loads the rules from `paths` now (an error stops start-up), then keeps
/// them current (`crate::reload`).
pub fn watch(paths: Vec<PathBuf>, poll: Duration) -> Result<watch::Receiver<Arc<Rules>>, ConfigErrors> {
    let files = paths.clone();
    crate::reload::watch(
        "rate limit config",
        poll,
        move || read_sources(&paths),
        |sources| parse(sources),
        move |rules: &Rules| {
            let (domains, limits) = rules.size();
            tracing::info!(domains, limits, files = ?files, "rate limit config loaded");
        },
    )
}
