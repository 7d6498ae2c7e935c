//! Joining the cluster at start: the datastore hands out (or confirms) this
//! node's pod CIDR, over any [`Datastore`].
//!
//! A node that was here before asks for its last CIDR first (cached in the
//! state dir: it may have been released while the node was away). With a
//! remote store unreachable ([`Datastore::STARTS_WITH_CACHED_CIDR`]), such a
//! node starts with its last CIDR and publishes itself once the store is
//! back (the datapath forwards meanwhile); a new node waits for the store.
//! A nodes file that cannot be read is waited for too (it is never
//! overwritten). Someone holding the CIDR this node asks for, or a cluster
//! CIDR with none left, is an error: waiting would not change it.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;
use tracing::warn;

use crate::datastore::{Datastore, DatastoreError, JoinRequest};

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The datastore refused for good (conflict, exhaustion).
    #[error("joining the cluster through {endpoint}")]
    Refused {
        endpoint: String,
        #[source]
        source: DatastoreError,
    },
    #[error("caching the pod CIDR in {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pauses between attempts: `first`, doubled up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// Half a second up to ten: a store that comes back is used within ten
    /// seconds, and a waiting agent does not hammer it.
    fn default() -> Self {
        Self {
            first: Duration::from_millis(500),
            max: Duration::from_secs(10),
        }
    }
}

/// Where the pod CIDR this node had last time is kept.
#[must_use]
pub fn cached_cidr_path(state_dir: &Path) -> PathBuf {
    state_dir.join("pod-cidr")
}

/// The pod CIDR this node had last time, if it was cached and reads.
#[must_use]
pub fn read_cached_cidr(state_dir: &Path) -> Option<Ipv4Net> {
    std::fs::read_to_string(cached_cidr_path(state_dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Keeps `cidr` for the next start.
pub fn write_cached_cidr(state_dir: &Path, cidr: Ipv4Net) -> Result<(), JoinError> {
    let path = cached_cidr_path(state_dir);
    std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&path, cidr.to_string()))
        .map_err(|source| JoinError::Cache { path, source })
}

/// Whether waiting cannot change the datastore's answer.
fn is_final(e: &DatastoreError) -> bool {
    matches!(
        e,
        DatastoreError::Conflict { .. } | DatastoreError::Exhausted { .. }
    )
}

/// Joins through the store `connect` reaches (called again for every
/// attempt: a connection may be what failed), asking for `cached` (this
/// node's last CIDR) first; returns the pod CIDR to run with. Retries with
/// `backoff` until it joins, gives up on a final refusal, and with a
/// remote store unreachable starts with `cached` if there is one.
pub async fn join<S, C, F>(
    mut connect: C,
    request: &JoinRequest,
    cached: Option<Ipv4Net>,
    backoff: Backoff,
) -> Result<Ipv4Net, JoinError>
where
    S: Datastore,
    C: FnMut() -> F,
    F: Future<Output = Result<S, DatastoreError>>,
{
    let request = JoinRequest {
        preferred: cached,
        ..request.clone()
    };
    let mut delay = backoff.first;
    loop {
        let mut endpoint = String::new();
        let attempt = async {
            let mut store = connect().await?;
            endpoint = store.endpoint();
            store.join(&request).await
        }
        .await;
        let error = match attempt {
            Ok(cidr) => return Ok(cidr),
            Err(e) if is_final(&e) => {
                return Err(JoinError::Refused {
                    endpoint,
                    source: e,
                });
            }
            Err(e) => e,
        };
        if S::STARTS_WITH_CACHED_CIDR
            && let Some(cidr) = cached
        {
            warn!(error = %error, %cidr, "the datastore is unreachable; starting with the last known pod CIDR");
            return Ok(cidr);
        }
        warn!(error = %error, retry_in = ?delay, "cannot join through the datastore; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{net::Ipv4Addr, sync::Arc, sync::atomic::AtomicU32};

    use super::*;
    use crate::datastore::{
        file::{FileDatastore, Follower},
        memory::MemoryDatastore,
    };

    const FAST: Backoff = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(4),
    };

    /// A node asking for a /24 of 10.244.0.0/16, at 192.168.100.`host`.
    pub(crate) fn request(name: &str, host: u8) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            node_ip: Ipv4Addr::new(192, 168, 100, host),
            pod_cidr: None,
            preferred: None,
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            node_prefix: 24,
        }
    }

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    async fn join_memory(
        store: &MemoryDatastore,
        request: &JoinRequest,
        cached: Option<Ipv4Net>,
    ) -> Result<Ipv4Net, JoinError> {
        let store = store.clone();
        join(
            move || {
                let store = store.clone();
                async move { Ok::<_, DatastoreError>(store) }
            },
            request,
            cached,
            FAST,
        )
        .await
    }

    #[tokio::test]
    async fn a_fresh_node_gets_the_first_free_cidr_and_is_published() {
        let store = MemoryDatastore::new();
        let a = join_memory(&store, &request("a", 1), None)
            .await
            .expect("a");
        let b = join_memory(&store, &request("b", 2), None)
            .await
            .expect("b");
        assert_eq!(a, cidr("10.244.0.0/24"));
        assert_eq!(b, cidr("10.244.1.0/24"));
        let snapshot = store.snapshot();
        assert_eq!(snapshot.live["a"].pod_cidr, a, "claimed and published");
        assert_eq!(snapshot.claims[&b], "b");
    }

    #[tokio::test]
    async fn a_returning_node_gets_its_cached_cidr_back_when_free() {
        let store = MemoryDatastore::new();
        join_memory(&store, &request("a", 1), None)
            .await
            .expect("a");
        // "r" had 10.244.7.0/24 before its claim was released.
        let got = join_memory(&store, &request("r", 3), Some(cidr("10.244.7.0/24")))
            .await
            .expect("r");
        assert_eq!(got, cidr("10.244.7.0/24"));
        // Taken meanwhile: the node gets a free one instead.
        let got = join_memory(&store, &request("s", 4), Some(cidr("10.244.7.0/24")))
            .await
            .expect("s");
        assert_eq!(got, cidr("10.244.1.0/24"));
        // A node that still holds a claim keeps it, whatever its cache says.
        let again = join_memory(&store, &request("a", 1), Some(cidr("10.244.9.0/24")))
            .await
            .expect("a again");
        assert_eq!(again, cidr("10.244.0.0/24"));
    }

    #[tokio::test]
    async fn conflict_and_exhaustion_are_errors_not_retried() {
        let store = MemoryDatastore::new();
        join_memory(&store, &request("a", 1), None)
            .await
            .expect("a");
        let mut fixed = request("b", 2);
        fixed.pod_cidr = Some(cidr("10.244.0.0/24"));
        let err = join_memory(&store, &fixed, None)
            .await
            .expect_err("conflict");
        assert!(
            matches!(
                err,
                JoinError::Refused {
                    source: DatastoreError::Conflict { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(store.join_attempts(), 2, "one attempt, no retry");

        let mut small = request("c", 3);
        small.cluster_cidr = cidr("10.244.0.0/24");
        let err = join_memory(&store, &small, None)
            .await
            .expect_err("exhausted");
        assert!(
            matches!(
                err,
                JoinError::Refused {
                    source: DatastoreError::Exhausted { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(store.join_attempts(), 3, "one attempt, no retry");
    }

    #[tokio::test]
    async fn an_unreachable_store_starts_a_known_node_with_its_cached_cidr() {
        let store = MemoryDatastore::new();
        store.set_reachable(false);
        let got = join_memory(&store, &request("a", 1), Some(cidr("10.244.5.0/24")))
            .await
            .expect("cached");
        assert_eq!(got, cidr("10.244.5.0/24"));
        assert_eq!(store.snapshot().claims.len(), 0, "nothing written");
    }

    #[tokio::test]
    async fn a_new_node_waits_for_an_unreachable_store() {
        let store = MemoryDatastore::new();
        store.set_reachable(false);
        let joining = tokio::spawn({
            let store = store.clone();
            async move { join_memory(&store, &request("a", 1), None).await }
        });
        while store.join_attempts() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!joining.is_finished(), "still waiting");
        store.set_reachable(true);
        let got = joining.await.expect("task").expect("joined");
        assert_eq!(got, cidr("10.244.0.0/24"));
    }

    #[tokio::test]
    async fn a_failed_connection_is_retried() {
        let store = MemoryDatastore::new();
        let connects = Arc::new(AtomicU32::new(0));
        let got = join(
            || {
                let (store, connects) = (store.clone(), Arc::clone(&connects));
                async move {
                    if connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 2 {
                        return Err(DatastoreError::Invalid {
                            what: "test".into(),
                            msg: "refused".into(),
                        });
                    }
                    Ok(store)
                }
            },
            &request("a", 1),
            None,
            FAST,
        )
        .await
        .expect("joined");
        assert_eq!(got, cidr("10.244.0.0/24"));
        assert_eq!(connects.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> (PathBuf, Cleanup) {
        let dir = std::env::temp_dir().join(format!("podnet-join-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        (dir.clone(), Cleanup(dir))
    }

    #[tokio::test]
    async fn a_broken_nodes_file_is_waited_for_even_with_a_cached_cidr() {
        let (dir, _cleanup) = temp_dir("file");
        let path = dir.join("nodes.json");
        std::fs::write(&path, b"{\"nodes\": [").expect("broken file");
        let tries = Arc::new(AtomicU32::new(0));
        let joining = tokio::spawn({
            let (path, tries) = (path.clone(), Arc::clone(&tries));
            async move {
                join(
                    || {
                        tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let store =
                            Follower::new(FileDatastore::new(&path), Duration::from_secs(10));
                        async move { Ok::<_, DatastoreError>(store) }
                    },
                    &request("a", 1),
                    Some(cidr("10.244.5.0/24")),
                    FAST,
                )
                .await
            }
        });
        while tries.load(std::sync::atomic::Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!joining.is_finished(), "waits for the file");
        assert_eq!(
            std::fs::read(&path).expect("file"),
            b"{\"nodes\": [",
            "never overwritten"
        );
        std::fs::write(&path, b"{\"nodes\": []}").expect("repaired");
        let got = joining.await.expect("task").expect("joined");
        assert_eq!(
            got,
            cidr("10.244.5.0/24"),
            "the cached CIDR, free in the file"
        );
    }

    #[test]
    fn the_cidr_is_cached_in_the_state_dir() {
        let (dir, _cleanup) = temp_dir("cache");
        let state = dir.join("state");
        assert_eq!(read_cached_cidr(&state), None);
        write_cached_cidr(&state, cidr("10.244.3.0/24")).expect("written");
        assert_eq!(read_cached_cidr(&state), Some(cidr("10.244.3.0/24")));
    }
}
