//! Cluster objects in etcd.
//!
//! Keys:
//! - `/podnet/cluster/<resource>/[<namespace>/]<name>` = the object's bytes
//!   ([`CLUSTER_PREFIX`]): written by the operator's role only.
//! - `/podnet/endpoints/<node>/<namespace>/<name>` = an endpoint record's
//!   bytes ([`ENDPOINTS_PREFIX`]): written by `<node>`'s role only
//!   ([`endpoint_prefix`] is the permission it needs).
//!
//! A value's revision is its key's mod revision. A write reads the key,
//! then puts in a transaction that compares the mod revision read, so a
//! write in between makes it fail (a conflict) instead of being
//! overwritten. Lists and watches cover both prefixes in one key range
//! (from `/podnet/cluster/` to the end of `/podnet/endpoints/`), so objects
//! and endpoint records are read at one revision and their events come in
//! one revision order; keys of that range under neither prefix are skipped.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};

use super::{
    ApplyOutcome, Decision, EndpointKey, Expect, Listing, ObjectEvent, ObjectPath, ObjectStore,
    ObjectStoreError, ObjectWatch, ReplaceOutcome, Snapshot, StoredEndpoint, StoredObject,
    check_node, check_selector, decide_apply, decide_delete, diff_endpoints, written,
};
use crate::datastore::etcd::{CLUSTER_PREFIX, EtcdAccess};

/// Where endpoint records live, one prefix per node.
pub const ENDPOINTS_PREFIX: &str = "/podnet/endpoints/";

/// etcd's default limit of operations in one transaction
/// (`--max-txn-ops`): a larger [`ObjectStore::replace_endpoints`] is split.
pub const MAX_TXN_OPS: usize = 128;

/// How many times [`ObjectStore::replace_endpoints`] starts over when the
/// node's records changed between its read and its write.
const REPLACE_ATTEMPTS: usize = 3;

/// The etcd key of an object.
#[must_use]
pub fn object_key(path: &ObjectPath) -> String {
    format!("{CLUSTER_PREFIX}{path}")
}

/// The etcd key of an endpoint record.
#[must_use]
pub fn endpoint_key(key: &EndpointKey) -> String {
    format!("{ENDPOINTS_PREFIX}{key}")
}

/// `/podnet/endpoints/<node>/`: the prefix node `node`'s etcd role must be
/// able to write (read-write, as a prefix). The trailing `/` keeps `node1`
/// off `node10`'s records.
#[must_use]
pub fn endpoint_prefix(node: &str) -> String {
    format!("{ENDPOINTS_PREFIX}{node}/")
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // The prefixes here are ASCII and end in '/': never 0xff.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// What a key of the watched range is.
enum Parsed {
    Object(ObjectPath),
    Endpoint(EndpointKey),
    /// Under one of the prefixes, but not a key of ours.
    Invalid(String),
    /// In the range, under neither prefix: not ours.
    Other,
}

fn parse_key(key: &[u8]) -> Parsed {
    let Ok(key) = std::str::from_utf8(key) else {
        return Parsed::Invalid(String::from_utf8_lossy(key).into_owned());
    };
    if let Some(rest) = key.strip_prefix(CLUSTER_PREFIX) {
        ObjectPath::parse(rest).map_or_else(|_| Parsed::Invalid(key.to_owned()), Parsed::Object)
    } else if let Some(rest) = key.strip_prefix(ENDPOINTS_PREFIX) {
        EndpointKey::parse(rest).map_or_else(|_| Parsed::Invalid(key.to_owned()), Parsed::Endpoint)
    } else {
        Parsed::Other
    }
}

/// Sorts a range read into a snapshot (revision left to the caller).
fn sort_kvs(kvs: &[KeyValue]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for kv in kvs {
        match parse_key(kv.key()) {
            Parsed::Object(path) => snapshot.objects.push(StoredObject {
                path,
                value: kv.value().to_vec(),
                revision: kv.mod_revision(),
            }),
            Parsed::Endpoint(key) => snapshot.endpoints.push(StoredEndpoint {
                key,
                value: kv.value().to_vec(),
                revision: kv.mod_revision(),
            }),
            Parsed::Invalid(key) => snapshot.invalid.push(key),
            Parsed::Other => {}
        }
    }
    snapshot
}

/// Cluster objects and endpoint records in etcd, over one client.
#[derive(Clone)]
pub struct EtcdObjectStore {
    client: Client,
    endpoint: String,
}

impl EtcdObjectStore {
    /// Over an existing client (the agent's connection); `endpoint` names
    /// it in errors.
    #[must_use]
    pub fn new(client: Client, endpoint: &str) -> Self {
        Self {
            client,
            endpoint: endpoint.to_owned(),
        }
    }

    /// Connects to the first of `endpoints` that answers a read, with
    /// `access`'s TLS and user; each request times out after `timeout`.
    pub async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self, ObjectStoreError> {
        let mut last = None;
        for endpoint in endpoints {
            match Self::connect_one(endpoint, access, timeout).await {
                Ok(store) => return Ok(store),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ObjectStoreError::NoEndpoints))
    }

    /// Connects to one member (as the agent's datastore does: one member,
    /// short timeouts, `require_leader` so a member cut off from the others
    /// refuses instead of serving stale data) and checks that it answers.
    pub async fn connect_one(
        endpoint: &str,
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self, ObjectStoreError> {
        access.check_endpoints(&[endpoint.to_owned()])?;
        let options = access.apply(
            ConnectOptions::new()
                .with_connect_timeout(timeout)
                .with_timeout(timeout)
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
                .with_require_leader(true),
        );
        let client = Client::connect([endpoint], Some(options))
            .await
            .map_err(|source| ObjectStoreError::Etcd {
                endpoint: endpoint.to_owned(),
                action: "connecting".into(),
                source: Box::new(source),
            })?;
        let mut store = Self::new(client, endpoint);
        store
            .client
            .get(
                CLUSTER_PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(store.err("reading the cluster objects"))?;
        Ok(store)
    }

    /// The client (for a caller that also needs etcd directly).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err(
        &self,
        action: impl Into<String>,
    ) -> impl FnOnce(etcd_client::Error) -> ObjectStoreError {
        let (endpoint, action) = (self.endpoint.clone(), action.into());
        move |source| ObjectStoreError::Etcd {
            endpoint,
            action,
            source: Box::new(source),
        }
    }

    /// The value and mod revision at `key`, if any.
    async fn read(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, ObjectStoreError> {
        let response = self
            .client
            .get(key, None)
            .await
            .map_err(self.err(format!("reading {key}")))?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Runs `op` on `key` if its mod revision is still `base` (0: absent);
    /// otherwise a conflict naming the revision found. The revision of the
    /// write when it committed.
    async fn write_if(
        &mut self,
        key: &str,
        base: i64,
        op: TxnOp,
        action: &str,
    ) -> Result<i64, ObjectStoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, base)])
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("{action} {key}")))?;
        if response.succeeded() {
            return Ok(response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision));
        }
        let found = response
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(get) => {
                    Some(get.kvs().first().map_or(0, KeyValue::mod_revision))
                }
                _ => None,
            })
            .unwrap_or(0);
        Err(ObjectStoreError::Conflict {
            key: key.to_owned(),
            expected: base,
            found,
        })
    }

    /// One attempt at [`ObjectStore::replace_endpoints`]: a conflict with
    /// `Ok(Err(..))` when the node's records changed between the read and
    /// the first write (nothing written: try again).
    async fn try_replace(
        &mut self,
        node: &str,
        records: &[(EndpointKey, Vec<u8>)],
    ) -> Result<Result<ReplaceOutcome, ObjectStoreError>, ObjectStoreError> {
        let prefix = endpoint_prefix(node);
        let (current, read_at) = self.list_endpoints(Some(node)).await?;
        let diff = diff_endpoints(node, &current, records)?;
        let mut outcome = ReplaceOutcome {
            written: diff.puts.len(),
            removed: diff.deletes.len(),
            unchanged: diff.unchanged,
            transactions: 0,
            revision: read_at,
        };
        let ops: Vec<TxnOp> = diff
            .deletes
            .iter()
            .map(|key| TxnOp::delete(endpoint_key(key), None))
            .chain(
                diff.puts
                    .iter()
                    .map(|(key, value)| TxnOp::put(endpoint_key(key), value.clone(), None)),
            )
            .collect();
        let mut since = read_at;
        for chunk in ops.chunks(MAX_TXN_OPS) {
            // Nothing of the node's changed since the last read or write
            // (every key's mod revision is at most `since`), so what was
            // decided still holds.
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(prefix.as_str(), CompareOp::Less, since + 1)
                        .with_prefix(),
                ])
                .and_then(chunk.to_vec());
            let response = self
                .client
                .txn(txn)
                .await
                .map_err(self.err(format!("replacing node {node}'s endpoint records")))?;
            if !response.succeeded() {
                let conflict = ObjectStoreError::Conflict {
                    key: prefix,
                    expected: since,
                    found: response
                        .header()
                        .map_or(0, etcd_client::ResponseHeader::revision),
                };
                if outcome.transactions == 0 {
                    return Ok(Err(conflict));
                }
                // Half replaced: a concurrent writer of this node's prefix
                // (only the node itself may write it). Not retried: the
                // other writer is the node, and the caller decides.
                return Err(conflict);
            }
            since = response
                .header()
                .map_or(since, etcd_client::ResponseHeader::revision);
            outcome.transactions += 1;
            outcome.revision = since;
        }
        Ok(Ok(outcome))
    }
}

impl ObjectStore for EtcdObjectStore {
    type Watch = EtcdWatch;

    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    async fn get(&mut self, path: &ObjectPath) -> Result<Option<StoredObject>, ObjectStoreError> {
        Ok(self
            .read(&object_key(path))
            .await?
            .map(|(value, revision)| StoredObject {
                path: path.clone(),
                value,
                revision,
            }))
    }

    async fn list(
        &mut self,
        resource: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Listing, ObjectStoreError> {
        check_selector(resource, namespace)?;
        let prefix = match (resource, namespace) {
            (Some(r), Some(ns)) => format!("{CLUSTER_PREFIX}{r}/{ns}/"),
            (Some(r), None) => format!("{CLUSTER_PREFIX}{r}/"),
            (None, _) => CLUSTER_PREFIX.to_owned(),
        };
        let response = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err(format!("listing {prefix}")))?;
        let snapshot = sort_kvs(response.kvs());
        Ok(Listing {
            objects: snapshot
                .objects
                .into_iter()
                .filter(|o| o.path.matches(resource, namespace))
                .collect(),
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
        })
    }

    async fn apply(
        &mut self,
        path: &ObjectPath,
        value: &[u8],
        expected: Expect,
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let key = object_key(path);
        let current = self.read(&key).await?;
        let current = current.as_ref().map(|(v, r)| (v.as_slice(), *r));
        match decide_apply(&key, current, value, expected)? {
            Decision::Unchanged(revision) => Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => {
                let op = TxnOp::put(key.as_str(), value, None);
                let revision = self.write_if(&key, base, op, "writing").await?;
                Ok(written(base, revision))
            }
        }
    }

    async fn delete(
        &mut self,
        path: &ObjectPath,
        expected: Expect,
    ) -> Result<bool, ObjectStoreError> {
        let key = object_key(path);
        let current = self.read(&key).await?.map(|(_, r)| r);
        let Some(base) = decide_delete(&key, current, expected)? else {
            return Ok(false);
        };
        let op = TxnOp::delete(key.as_str(), None);
        self.write_if(&key, base, op, "deleting").await?;
        Ok(true)
    }

    async fn put_endpoint(
        &mut self,
        key: &EndpointKey,
        value: &[u8],
    ) -> Result<ApplyOutcome, ObjectStoreError> {
        let etcd_key = endpoint_key(key);
        let current = self.read(&etcd_key).await?;
        let current = current.as_ref().map(|(v, r)| (v.as_slice(), *r));
        match decide_apply(&etcd_key, current, value, Expect::Any)? {
            Decision::Unchanged(revision) => Ok(ApplyOutcome::Unchanged(revision)),
            Decision::Write { base } => {
                // The node is the record's only writer: no compare (a put
                // of its own racing with itself, the later one holds).
                let response = self
                    .client
                    .put(etcd_key.as_str(), value, None)
                    .await
                    .map_err(self.err(format!("writing {etcd_key}")))?;
                let revision = response
                    .header()
                    .map_or(0, etcd_client::ResponseHeader::revision);
                Ok(written(base, revision))
            }
        }
    }

    async fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<bool, ObjectStoreError> {
        let etcd_key = endpoint_key(key);
        let response = self
            .client
            .delete(etcd_key.as_str(), None)
            .await
            .map_err(self.err(format!("deleting {etcd_key}")))?;
        Ok(response.deleted() > 0)
    }

    async fn replace_endpoints(
        &mut self,
        node: &str,
        records: &[(EndpointKey, Vec<u8>)],
    ) -> Result<ReplaceOutcome, ObjectStoreError> {
        // Checked before anything is read (a bad node name would make a
        // prefix that covers other nodes' records).
        check_node(node)?;
        let mut attempt = 1;
        loop {
            match self.try_replace(node, records).await? {
                Err(conflict) if attempt < REPLACE_ATTEMPTS => {
                    tracing::debug!(%conflict, attempt, "replacing endpoint records again");
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    async fn list_endpoints(
        &mut self,
        node: Option<&str>,
    ) -> Result<(Vec<StoredEndpoint>, i64), ObjectStoreError> {
        let prefix = match node {
            Some(node) => {
                check_node(node)?;
                endpoint_prefix(node)
            }
            None => ENDPOINTS_PREFIX.to_owned(),
        };
        let response = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err(format!("listing {prefix}")))?;
        Ok((
            sort_kvs(response.kvs()).endpoints,
            response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
        ))
    }

    async fn snapshot(&mut self) -> Result<Snapshot, ObjectStoreError> {
        let response = self
            .client
            .get(
                CLUSTER_PREFIX,
                Some(GetOptions::new().with_range(prefix_end(ENDPOINTS_PREFIX))),
            )
            .await
            .map_err(self.err("reading the cluster objects and endpoint records"))?;
        Ok(Snapshot {
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            ..sort_kvs(response.kvs())
        })
    }

    async fn watch(&mut self, from_revision: i64) -> Result<EtcdWatch, ObjectStoreError> {
        let options = WatchOptions::new()
            .with_range(prefix_end(ENDPOINTS_PREFIX))
            .with_start_revision(from_revision);
        let stream = self
            .client
            .watch(CLUSTER_PREFIX, Some(options))
            .await
            .map_err(self.err(format!(
                "watching the cluster objects from revision {from_revision}"
            )))?;
        Ok(EtcdWatch {
            stream,
            endpoint: self.endpoint.clone(),
        })
    }
}

/// A watch on etcd's objects and endpoint records.
pub struct EtcdWatch {
    stream: WatchStream,
    endpoint: String,
}

impl ObjectWatch for EtcdWatch {
    async fn next(&mut self) -> Result<Vec<ObjectEvent>, ObjectStoreError> {
        loop {
            let response =
                self.stream
                    .message()
                    .await
                    .map_err(|source| ObjectStoreError::Etcd {
                        endpoint: self.endpoint.clone(),
                        action: "watching the cluster objects".into(),
                        source: Box::new(source),
                    })?;
            let Some(response) = response else {
                return Err(ObjectStoreError::WatchLost {
                    reason: format!("etcd {} closed the watch", self.endpoint),
                });
            };
            if response.canceled() {
                // A start revision that was compacted: etcd creates the
                // watch, then cancels it with the compaction point.
                if response.compact_revision() > 0 {
                    return Err(ObjectStoreError::Compacted {
                        compact_revision: response.compact_revision(),
                    });
                }
                return Err(ObjectStoreError::WatchLost {
                    reason: format!(
                        "etcd {} canceled the watch: {}",
                        self.endpoint,
                        response.cancel_reason()
                    ),
                });
            }
            let events: Vec<ObjectEvent> = response.events().iter().filter_map(to_event).collect();
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// An etcd event as ours; `None` for a key that is not an object or an
/// endpoint record (left out, as a list leaves it out).
fn to_event(event: &etcd_client::Event) -> Option<ObjectEvent> {
    let kv = event.kv()?;
    // A delete's kv carries the deletion's revision as its mod revision.
    let revision = kv.mod_revision();
    let put = matches!(event.event_type(), EventType::Put);
    match parse_key(kv.key()) {
        Parsed::Object(path) if put => Some(ObjectEvent::Put(StoredObject {
            path,
            value: kv.value().to_vec(),
            revision,
        })),
        Parsed::Object(path) => Some(ObjectEvent::Delete { path, revision }),
        Parsed::Endpoint(key) if put => Some(ObjectEvent::EndpointPut(StoredEndpoint {
            key,
            value: kv.value().to_vec(),
            revision,
        })),
        Parsed::Endpoint(key) => Some(ObjectEvent::EndpointDelete { key, revision }),
        Parsed::Invalid(_) | Parsed::Other => None,
    }
}
