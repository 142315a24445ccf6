//! Wakes local waiters by key when a script announces a change on a pub/sub
//! channel: Fetch callers waiting for another caller's fill, Acquire callers
//! waiting for a lock.
//!
//! Each store keeps one pub/sub connection subscribed to its channel. Its
//! scripts publish a Redis key whenever the awaited state of that key ends (a
//! fill lease filled, voided or handed back; a lock released); the listener
//! wakes the local waiters of that key, who then try again. A waiter registers
//! *before* its attempt, so an event between the attempt and the wait still
//! wakes it. Should the subscription drop, waiters still wake when the lease
//! they wait on expires (they sleep until then at the latest), and every
//! waiter is woken once the subscription is back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::watch;

use super::Redis;

/// Local waiters, by awaited Redis key.
#[derive(Default)]
pub struct Waiters {
    /// One channel per awaited key; removed when its last waiter leaves.
    by_key: Mutex<HashMap<String, watch::Sender<u64>>>,
}

/// One caller's registration; deregisters on drop (also when cancelled).
pub struct Wait {
    /// The registry to leave on drop.
    waiters: Arc<Waiters>,
    /// The awaited key.
    key: String,
    /// Bumped at every event of the key.
    events: watch::Receiver<u64>,
}

impl Waiters {
    /// Registers interest in `key` from now on.
    pub fn register(self: &Arc<Self>, key: &str) -> Wait {
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let events = by_key.entry(key.to_string()).or_insert_with(|| watch::channel(0).0).subscribe();
        Wait { waiters: Arc::clone(self), key: key.to_string(), events }
    }

    /// Wakes the waiters of `key`.
    fn wake(&self, key: &str) {
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = by_key.get(key) {
            sender.send_modify(|n| *n += 1);
        }
    }

    /// Wakes every waiter (after events may have been missed).
    fn wake_all(&self) {
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        for sender in by_key.values() {
            sender.send_modify(|n| *n += 1);
        }
    }

    /// Listens on `channel` for as long as the returned task runs,
    /// reconnecting after any failure.
    pub fn listen(self: Arc<Self>, redis: Redis, channel: String) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match redis.pubsub().await {
                    Ok(mut pubsub) => {
                        let subscribed = tokio::time::timeout(Duration::from_secs(2), pubsub.subscribe(&channel)).await;
                        if matches!(subscribed, Ok(Ok(()))) {
                            self.wake_all();
                            let mut messages = pubsub.on_message();
                            while let Some(message) = messages.next().await {
                                if let Ok(key) = message.get_payload::<String>() {
                                    self.wake(&key);
                                }
                            }
                        }
                        tracing::debug!(%channel, "subscription lost; reconnecting");
                    }
                    Err(err) => tracing::debug!(%err, %channel, "subscription failed; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }
}

impl Wait {
    /// Resolves at the next event of this key after registration or the
    /// previous call.
    pub async fn changed(&mut self) {
        // The sender lives as long as any registration does, so this only
        // errors if the map entry was removed, which our own presence prevents.
        let _ = self.events.changed().await;
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut by_key = self.waiters.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        // Registrations are created and dropped under this lock, so a count of
        // one is this registration alone.
        if by_key.get(&self.key).is_some_and(|sender| sender.receiver_count() <= 1) {
            by_key.remove(&self.key);
        }
    }
}
