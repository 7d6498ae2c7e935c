//! The etcd v3 datastore, as flannel and Calico use one.
//!
//! Keys (prefix `/podnet/`):
//! - `cidrs/<network>_<prefix>` = node name: the claim on a node pod CIDR,
//!   made with a transaction that only succeeds when the key does not exist
//!   yet (create revision 0), so two nodes never hold one CIDR even when they
//!   start at the same moment. Claims have no lease: a node that comes back
//!   gets its CIDR again. A claim is only released by [`EtcdDatastore::release`]
//!   after the node has been gone for the release delay (see
//!   [`super::membership`]).
//! - `nodes/<name>` = [`NodeRecord`] under a lease with a TTL, kept alive by
//!   the agent: the node's liveness. etcd deletes it when the lease expires.
//! - `members/<name>` = [`NodeRecord`] without a lease: the node's durable
//!   record, so that a node whose lease expired is still known (and routed
//!   during the grace period) by every agent, also one that restarted since.
//! - `gone/<name>` = `{"since": <unix seconds>}`: the node's tombstone,
//!   written by the first agent that saw the node without its lease.
//!
//! A node publishes itself (liveness key, record, tombstone removed) in one
//! transaction that checks its claim still names it, and a claim is released
//! in one transaction that checks the node is still without a lease, its
//! tombstone is still the one the decision was made on, and the claim still
//! names it. Whichever of the two commits first, the other fails: a node
//! coming back while its claim is being released either keeps its claim
//! (the release fails) or sees it gone and claims again (its publish
//! fails), and two agents releasing at once release once.
//!
//! A connection talks to one member. The client's balanced channel over all
//! members is not used: a member that is down stays "ready" in it and every
//! request the balancer sends there fails, so an agent would lose every few
//! requests while one member of three is down. The agent moves to the next
//! member instead when its member fails (`agent::follow`).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{
    DatastoreError, JoinRequest, NodeRecord, candidate_cidr,
    membership::{Policy, Release, Snapshot, Tombstone},
    store::{Datastore, LeaseId, Observation, claim_and_publish},
};

const PREFIX: &str = "/podnet/";
const CIDRS: &str = "/podnet/cidrs/";
const NODES: &str = "/podnet/nodes/";
const MEMBERS: &str = "/podnet/members/";
const GONE: &str = "/podnet/gone/";

fn cidr_key(cidr: Ipv4Net) -> String {
    format!("{CIDRS}{}_{}", cidr.network(), cidr.prefix_len())
}

fn parse_cidr_key(key: &str) -> Option<Ipv4Net> {
    let (net, prefix) = key.strip_prefix(CIDRS)?.split_once('_')?;
    Ipv4Net::new(net.parse().ok()?, prefix.parse().ok()?).ok()
}

fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

fn member_key(name: &str) -> String {
    format!("{MEMBERS}{name}")
}

fn gone_key(name: &str) -> String {
    format!("{GONE}{name}")
}

/// The value of a tombstone key.
#[derive(Debug, Serialize, Deserialize)]
struct TombstoneValue {
    since: u64,
}

/// How one member of the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The answering member's ID.
    pub member_id: u64,
    /// The leader's member ID (0: none).
    pub leader: u64,
}

/// A connection to one member of the etcd cluster.
#[derive(Clone)]
pub struct EtcdDatastore {
    client: Client,
    lease_ttl: i64,
    endpoint: String,
}

impl EtcdDatastore {
    /// Connects to the first of `endpoints` that answers.
    pub async fn connect(
        endpoints: &[String],
        lease_ttl: Duration,
    ) -> Result<Self, DatastoreError> {
        Self::connect_from(endpoints, 0, lease_ttl)
            .await
            .map(|(store, _)| store)
    }

    /// Tries `endpoints` in turn, starting at index `first`; returns the
    /// first member that answers and its index.
    pub async fn connect_from(
        endpoints: &[String],
        first: usize,
        lease_ttl: Duration,
    ) -> Result<(Self, usize), DatastoreError> {
        let mut last = None;
        for k in 0..endpoints.len() {
            let i = (first + k) % endpoints.len();
            match Self::connect_one(&endpoints[i], lease_ttl).await {
                Ok(store) => return Ok((store, i)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DatastoreError::EtcdProtocol {
            endpoint: String::new(),
            action: "connecting".into(),
            msg: "no endpoints".into(),
        }))
    }

    /// Connects to one member and checks that it serves: a linearizable
    /// read, answered only by a member that has a leader and a quorum.
    pub async fn connect_one(endpoint: &str, lease_ttl: Duration) -> Result<Self, DatastoreError> {
        // Short timeouts: the caller moves on to the next member. HTTP/2
        // pings find a member that vanished without closing the connection
        // (etcd refuses pings more often than every 5 s). `require_leader`:
        // a member cut off from the others refuses requests and ends
        // watches instead of serving what it had.
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_require_leader(true);
        let err = |action: &str| {
            let (endpoint, action) = (endpoint.to_owned(), action.to_owned());
            move |source| DatastoreError::Etcd {
                endpoint,
                action,
                source: Box::new(source),
            }
        };
        let client = Client::connect([endpoint], Some(options))
            .await
            .map_err(err("connecting"))?;
        let mut store = Self {
            client,
            lease_ttl: i64::try_from(lease_ttl.as_secs()).unwrap_or(30).max(2),
            endpoint: endpoint.to_owned(),
        };
        store
            .client
            .get(
                PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(err("reading"))?;
        Ok(store)
    }

    /// The member this connection talks to.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn err(&self, action: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> DatastoreError {
        let (endpoint, action) = (self.endpoint.clone(), action.into());
        move |source| DatastoreError::Etcd {
            endpoint,
            action,
            source: Box::new(source),
        }
    }

    fn protocol(&self, action: impl Into<String>, msg: impl Into<String>) -> DatastoreError {
        DatastoreError::EtcdProtocol {
            endpoint: self.endpoint.clone(),
            action: action.into(),
            msg: msg.into(),
        }
    }

    /// The answering member and the leader it knows.
    pub async fn member_status(&mut self) -> Result<MemberStatus, DatastoreError> {
        let status = self
            .client
            .status()
            .await
            .map_err(self.err("asking for the member status"))?;
        Ok(MemberStatus {
            member_id: status
                .header()
                .map_or(0, etcd_client::ResponseHeader::member_id),
            leader: status.leader(),
        })
    }

    async fn claims(&mut self) -> Result<Vec<(Ipv4Net, String)>, DatastoreError> {
        let response = self
            .client
            .get(CIDRS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err("reading the CIDR claims"))?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let cidr = parse_cidr_key(kv.key_str().ok()?)?;
                Some((cidr, kv.value_str().ok()?.to_owned()))
            })
            .collect())
    }

    /// Claims `cidr` for `name`; `Ok(false)` when someone else holds it.
    async fn claim(&mut self, cidr: Ipv4Net, name: &str) -> Result<bool, DatastoreError> {
        let key = cidr_key(cidr);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), name, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("claiming {cidr} for {name}")))?;
        if response.succeeded() {
            return Ok(true);
        }
        // Already claimed: ours (a restart) or someone else's.
        Ok(txn_get_value(&response).as_deref() == Some(name))
    }

    /// Takes (or gets back) this node's pod CIDR and publishes its record
    /// under a fresh lease; returns the CIDR and the lease ID.
    pub async fn join(&mut self, request: &JoinRequest) -> Result<(Ipv4Net, i64), DatastoreError> {
        claim_and_publish(self, request).await
    }

    /// Takes (or confirms) this node's pod CIDR: the fixed one, the one it
    /// holds, the preferred one if free, or the first free one.
    pub async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        if let Some(cidr) = request.pod_cidr {
            if self.claim(cidr, &request.name).await? {
                return Ok(cidr);
            }
            let holder = self
                .claims()
                .await?
                .into_iter()
                .find(|(c, _)| *c == cidr)
                .map_or_else(|| "?".to_owned(), |(_, n)| n);
            return Err(DatastoreError::Conflict { cidr, holder });
        }
        loop {
            let claims = self.claims().await?;
            if let Some((cidr, _)) = claims.iter().find(|(_, owner)| owner == &request.name) {
                return Ok(*cidr);
            }
            let taken: Vec<Ipv4Net> = claims.iter().map(|(c, _)| *c).collect();
            let candidate = candidate_cidr(request, &taken)?;
            if self.claim(candidate, &request.name).await? {
                return Ok(candidate);
            }
            // Lost a race for it: look again.
        }
    }

    /// Publishes this node (liveness key under a new lease, durable
    /// record, tombstone removed) if its claim on `cidr` still names it;
    /// returns the lease ID.
    pub async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<i64, DatastoreError> {
        let name = &request.name;
        let lease = self
            .client
            .lease_grant(self.lease_ttl, None)
            .await
            .map_err(self.err(format!("granting a lease for {name}")))?
            .id();
        let record = NodeRecord {
            name: name.clone(),
            node_ip: request.node_ip,
            pod_cidr: cidr,
        };
        let value = serde_json::to_string(&record)
            .map_err(|e| self.protocol(format!("encoding {name}'s record"), e.to_string()))?;
        let claim = cidr_key(cidr);
        let txn = Txn::new()
            .when([Compare::value(
                claim.clone(),
                CompareOp::Equal,
                name.as_str(),
            )])
            .and_then([
                TxnOp::put(
                    node_key(name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(member_key(name), value, None),
                TxnOp::delete(gone_key(name), None),
            ])
            .or_else([TxnOp::get(claim, None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("publishing {name} ({cidr})")))?;
        if response.succeeded() {
            return Ok(lease);
        }
        // Nothing was written under it; let it go now rather than at its TTL.
        let _ = self.client.lease_revoke(lease).await;
        Err(match txn_get_value(&response) {
            Some(holder) => DatastoreError::Conflict { cidr, holder },
            None => DatastoreError::ClaimLost {
                cidr,
                node: name.clone(),
            },
        })
    }

    /// Keeps `lease` alive until it fails (etcd gone, or the lease expired).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<(), DatastoreError> {
        let action = format!("keeping lease {lease:x} alive");
        let (mut keeper, mut responses) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(self.err(action.clone()))?;
        let period = Duration::from_secs(u64::try_from(self.lease_ttl / 3).unwrap_or(1).max(1));
        loop {
            keeper
                .keep_alive()
                .await
                .map_err(self.err(action.clone()))?;
            match responses
                .message()
                .await
                .map_err(self.err(action.clone()))?
            {
                Some(response) if response.ttl() > 0 => {}
                _ => return Err(self.protocol(action, "the lease expired")),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Ends `lease` now: its keys go at once (a node leaving for good, or a
    /// test standing in for an expiry).
    pub async fn revoke(&mut self, lease: i64) -> Result<(), DatastoreError> {
        self.client
            .lease_revoke(lease)
            .await
            .map_err(self.err(format!("revoking lease {lease:x}")))?;
        Ok(())
    }

    /// Everything under `/podnet/`, read at one revision.
    pub async fn snapshot(&mut self) -> Result<Snapshot, DatastoreError> {
        let response = self
            .client
            .get(PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err("reading the cluster"))?;
        let mut snapshot = Snapshot {
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            ..Snapshot::default()
        };
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else {
                snapshot
                    .invalid
                    .push(String::from_utf8_lossy(kv.key()).into_owned());
                continue;
            };
            let parsed = if let Some(name) = key.strip_prefix(NODES) {
                serde_json::from_slice::<NodeRecord>(kv.value())
                    .ok()
                    .filter(|r| r.name == name)
                    .map(|r| snapshot.live.insert(name.to_owned(), r))
                    .is_some()
            } else if let Some(name) = key.strip_prefix(MEMBERS) {
                serde_json::from_slice::<NodeRecord>(kv.value())
                    .ok()
                    .filter(|r| r.name == name)
                    .map(|r| snapshot.members.insert(name.to_owned(), r))
                    .is_some()
            } else if let Some(name) = key.strip_prefix(GONE) {
                serde_json::from_slice::<TombstoneValue>(kv.value())
                    .ok()
                    .map(|t| {
                        snapshot.gone.insert(
                            name.to_owned(),
                            Tombstone {
                                since: t.since,
                                mod_revision: kv.mod_revision(),
                            },
                        )
                    })
                    .is_some()
            } else if key.starts_with(CIDRS) {
                parse_cidr_key(key)
                    .zip(kv.value_str().ok())
                    .map(|(cidr, holder)| snapshot.claims.insert(cidr, holder.to_owned()))
                    .is_some()
            } else {
                // Someone else's key under our prefix: not ours to judge.
                true
            };
            if !parsed {
                snapshot.invalid.push(key.to_owned());
            }
        }
        Ok(snapshot)
    }

    /// Writes `name`'s tombstone with `since` (Unix seconds) unless it has a
    /// lease or a tombstone already; `Ok(true)` when written.
    pub async fn mark_gone(&mut self, name: &str, since: u64) -> Result<bool, DatastoreError> {
        let value = serde_json::to_string(&TombstoneValue { since })
            .map_err(|e| self.protocol(format!("encoding {name}'s tombstone"), e.to_string()))?;
        let txn = Txn::new()
            .when([
                Compare::version(node_key(name), CompareOp::Equal, 0),
                Compare::create_revision(gone_key(name), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(gone_key(name), value, None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("writing {name}'s tombstone")))?;
        Ok(response.succeeded())
    }

    /// Removes the tombstone of a node that is live again, if it is still
    /// the one at `revision`; `Ok(true)` when removed.
    pub async fn clear_tombstone(
        &mut self,
        name: &str,
        revision: i64,
    ) -> Result<bool, DatastoreError> {
        let txn = Txn::new()
            .when([
                Compare::version(node_key(name), CompareOp::Greater, 0),
                Compare::mod_revision(gone_key(name), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::delete(gone_key(name), None)]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(self.err(format!("removing {name}'s stale tombstone")))?;
        Ok(response.succeeded())
    }

    /// Releases a gone node's claims and forgets it, if everything the
    /// decision was made on still holds: no lease, the same tombstone, the
    /// claims still naming it. `Ok(false)` when something changed (it came
    /// back, or someone else released it first).
    pub async fn release(&mut self, release: &Release) -> Result<bool, DatastoreError> {
        let name = release.name.as_str();
        let mut when = vec![
            Compare::version(node_key(name), CompareOp::Equal, 0),
            Compare::mod_revision(gone_key(name), CompareOp::Equal, release.tombstone_revision),
        ];
        let mut ops = vec![
            TxnOp::delete(member_key(name), None),
            TxnOp::delete(gone_key(name), None),
        ];
        for cidr in &release.cidrs {
            when.push(Compare::value(cidr_key(*cidr), CompareOp::Equal, name));
            ops.push(TxnOp::delete(cidr_key(*cidr), None));
        }
        let response = self
            .client
            .txn(Txn::new().when(when).and_then(ops))
            .await
            .map_err(self.err(format!("releasing {name}'s claims {:?}", release.cidrs)))?;
        Ok(response.succeeded())
    }

    /// Waits for the next change under `/podnet/` after `revision`.
    pub async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        let action = "watching the cluster";
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = self
            .client
            .watch(PREFIX, Some(options))
            .await
            .map_err(self.err(action))?;
        loop {
            match stream.message().await.map_err(self.err(action))? {
                Some(response) if response.canceled() => {
                    return Err(self.protocol(
                        action,
                        format!("watch canceled: {}", response.cancel_reason()),
                    ));
                }
                Some(response) if !response.events().is_empty() => return Ok(()),
                Some(_) => {}
                None => return Err(self.protocol(action, "watch closed")),
            }
        }
    }
}

/// The value a transaction's `or_else` get found, if the key existed.
fn txn_get_value(response: &etcd_client::TxnResponse) -> Option<String> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
        _ => None,
    })
}

impl Datastore for EtcdDatastore {
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    const STARTS_WITH_CACHED_CIDR: bool = true;

    async fn join(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        Self::join(self, request).await.map(|(cidr, _lease)| cidr)
    }

    async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
        Self::claim_cidr(self, request).await
    }

    async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<LeaseId, DatastoreError> {
        Self::publish(self, request, cidr).await
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<(), DatastoreError> {
        Self::keep_alive(self, lease).await
    }

    async fn observe(
        &mut self,
        policy: Policy,
        me: &str,
        now: u64,
    ) -> Result<Observation, DatastoreError> {
        let snapshot = self.snapshot().await?;
        Ok(Observation::of_snapshot(&snapshot, policy, me, now))
    }

    async fn mark_gone(&mut self, name: &str, since: u64) -> Result<bool, DatastoreError> {
        Self::mark_gone(self, name, since).await
    }

    async fn clear_tombstone(&mut self, name: &str, revision: i64) -> Result<bool, DatastoreError> {
        Self::clear_tombstone(self, name, revision).await
    }

    async fn release(&mut self, release: &Release) -> Result<bool, DatastoreError> {
        Self::release(self, release).await
    }

    async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        Self::wait_change(self, revision).await
    }
}
