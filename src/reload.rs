//! Configuration files that change while the service runs (rate-limit rules,
//! API keys): read once at start-up, then again on SIGHUP and whenever their
//! contents change; a bad new version keeps the old one in force.

use std::{fmt::Display, sync::Arc, time::Duration};

use tokio::sync::watch;

/// Loads a file now with `read` then `parse` (an error stops start-up), then
/// keeps it current in a task, on SIGHUP and when `read` returns something
/// new (checked every `poll`; zero checks only on SIGHUP). `what` names the
/// file in log lines; `loaded` logs each version put in force. The task ends
/// when every receiver is gone.
pub fn watch<S, T, E>(
    what: &'static str,
    poll: Duration,
    read: impl Fn() -> Result<S, E> + Send + 'static,
    parse: impl Fn(&S) -> Result<T, E> + Send + 'static,
    loaded: impl Fn(&T) + Send + 'static,
) -> Result<watch::Receiver<Arc<T>>, E>
where
    S: PartialEq + Send + 'static,
    T: Send + Sync + 'static,
    E: Display + PartialEq + Send + 'static,
{
    let contents = read()?;
    let value = parse(&contents)?;
    loaded(&value);
    let (tx, rx) = watch::channel(Arc::new(value));
    // Registered here, before returning, so a SIGHUP sent once the server is
    // up never meets the default action (which ends the process).
    let mut hangup = hangup();
    let rejected = move |error: &E| tracing::error!(%error, "{what} rejected; the previous version stays in force");
    tokio::spawn(async move {
        let mut last = contents;
        // The last read failure logged, so a missing file is logged once, not every poll.
        let mut last_failure: Option<E> = None;
        loop {
            let forced = tokio::select! {
                () = tx.closed() => return,
                () = next_hangup(&mut hangup) => true,
                () = tokio::time::sleep(poll), if !poll.is_zero() => false,
            };
            let contents = match read() {
                Ok(contents) => contents,
                Err(error) => {
                    if forced || last_failure.as_ref() != Some(&error) {
                        rejected(&error);
                    }
                    last_failure = Some(error);
                    continue;
                }
            };
            last_failure = None;
            if !forced && contents == last {
                continue;
            }
            match parse(&contents) {
                Ok(value) => {
                    loaded(&value);
                    tx.send_replace(Arc::new(value));
                }
                Err(error) => rejected(&error),
            }
            // A bad file is reported once per change (or SIGHUP), not every poll.
            last = contents;
        }
    });
    Ok(rx)
}

/// A SIGHUP listener, if one could be registered.
#[cfg(unix)]
pub(crate) type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(crate) type Hangup = Option<()>;

/// Registers for SIGHUP (before the server is up, so a SIGHUP never meets
/// the default action, which ends the process).
#[cfg(unix)]
pub(crate) fn hangup() -> Hangup {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup()).map_err(|err| tracing::warn!(%err, "no SIGHUP reload")).ok()
}

#[cfg(not(unix))]
pub(crate) fn hangup() -> Hangup {
    None
}

/// Resolves at the next SIGHUP; never without a handler.
pub(crate) async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup
        && signal.recv().await.is_some()
    {
        return;
    }
    let _ = hangup;
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// A file whose contents the test sets, counting reads.
    struct Fake {
        text: Mutex<String>,
        reads: AtomicUsize,
    }

    impl Fake {
        fn set(&self, text: &str) {
            *self.text.lock().expect("lock") = text.to_string();
        }

        /// Waits until the reloader has read the file twice more: the
        /// contents set before the call have then been read and judged.
        async fn read_twice(&self) {
            let start = self.reads.load(Ordering::SeqCst);
            while self.reads.load(Ordering::SeqCst) < start + 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    #[tokio::test]
    async fn a_change_is_put_in_force_and_a_bad_version_keeps_the_old_one() {
        let fake = Arc::new(Fake { text: Mutex::new("1".into()), reads: AtomicUsize::new(0) });
        let reader = Arc::clone(&fake);
        let read = move || {
            reader.reads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(reader.text.lock().expect("lock").clone())
        };
        let parse = |text: &String| text.parse::<u32>().map_err(|err| err.to_string());
        let mut rx = watch("test file", Duration::from_millis(1), read, parse, |_| {}).expect("loads");
        assert_eq!(**rx.borrow(), 1);

        fake.set("2");
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("reloaded").expect("open");
        assert_eq!(**rx.borrow_and_update(), 2);

        fake.set("not a number");
        fake.read_twice().await;
        assert_eq!(**rx.borrow(), 2, "a bad version keeps the one in force");
        assert!(!rx.has_changed().expect("open"));

        fake.set("3");
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("reloaded").expect("open");
        assert_eq!(**rx.borrow(), 3);
    }

    #[tokio::test]
    async fn a_bad_file_at_start_up_is_an_error() {
        let err = watch(
            "test file",
            Duration::ZERO,
            || Ok::<_, String>("x".to_string()),
            |t: &String| t.parse::<u32>().map_err(|e| e.to_string()),
            |_| {},
        )
        .expect_err("refused");
        assert!(err.contains("invalid digit"), "{err}");
    }
}
