//! The task that keeps a node's endpoint records in the datastore equal
//! to what the agent holds (see the module docs of `cluster_objects`).

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{PublishState, Wanted};
use crate::datastore::objects::{ObjectStore, ObjectStoreError, ReplaceOutcome};

/// How the publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The pause after the first failure; doubled after each one.
    pub first_retry: Duration,
    /// The longest pause between attempts.
    pub max_retry: Duration,
    /// How often the records are made equal again without a change (a
    /// record removed or rewritten by hand, a write lost with a member).
    pub republish: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_millis(250),
            max_retry: Duration::from_secs(10),
            republish: Duration::from_mins(1),
        }
    }
}

fn lock(state: &Mutex<PublishState>) -> std::sync::MutexGuard<'_, PublishState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn replace<S, C, F>(
    store: &mut Option<S>,
    connect: &mut C,
    node: &str,
    wanted: &Wanted,
) -> Result<ReplaceOutcome, ObjectStoreError>
where
    S: ObjectStore,
    C: FnMut() -> F,
    F: Future<Output = Result<S, ObjectStoreError>>,
{
    let store = match store {
        Some(store) => store,
        None => store.insert(connect().await?),
    };
    let records: Vec<_> = wanted.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    store.replace_endpoints(node, &records).await
}

/// Publishes `node`'s records: whenever `wanted` changes (and at start),
/// after a failure (backoff) and every [`Timing::republish`], the node's
/// records become exactly `wanted`. A failed store is dropped and
/// `connect`ed again. Returns when the agent's handle is gone.
pub async fn publish<S, C, F>(
    node: String,
    mut connect: C,
    mut wanted: watch::Receiver<Wanted>,
    state: Arc<Mutex<PublishState>>,
    timing: Timing,
) where
    S: ObjectStore,
    C: FnMut() -> F + Send,
    F: Future<Output = Result<S, ObjectStoreError>> + Send,
{
    let mut store: Option<S> = None;
    // What the store holds as of the last success (`None`: not known).
    let mut published: Option<Wanted> = None;
    let mut pause = timing.first_retry;
    loop {
        let want = wanted.borrow_and_update().clone();
        if published.as_ref() != Some(&want) {
            match replace(&mut store, &mut connect, &node, &want).await {
                Ok(outcome) => {
                    if outcome.written + outcome.removed > 0 {
                        info!(
                            written = outcome.written,
                            removed = outcome.removed,
                            unchanged = outcome.unchanged,
                            revision = outcome.revision,
                            "endpoint records published"
                        );
                    }
                    let mut s = lock(&state);
                    // The agent may have changed the set meanwhile: in sync
                    // only if what was written is still what it wants.
                    s.in_sync = *wanted.borrow() == want;
                    s.revision = outcome.revision;
                    s.failures = 0;
                    s.last_error = None;
                    drop(s);
                    published = Some(want);
                    pause = timing.first_retry;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?pause, records = want.len(),
                          "publishing this node's endpoint records failed; retrying");
                    {
                        let mut s = lock(&state);
                        s.in_sync = false;
                        s.failures += 1;
                        s.last_error = Some(e.to_string());
                    }
                    store = None;
                    published = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(timing.max_retry);
                    continue;
                }
            }
        }
        tokio::select! {
            changed = wanted.changed() => {
                if changed.is_err() {
                    return;
                }
                lock(&state).in_sync = false;
            }
            () = tokio::time::sleep(timing.republish) => published = None,
        }
    }
}
