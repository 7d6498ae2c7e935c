//! The etcd v3 datastore, as flannel and Calico use one.
//!
//! Keys (prefix `/podnet/`):
//! - `cidrs/<network>_<prefix>` = node name: the claim on a node pod CIDR,
//!   made with a transaction that only succeeds when the key does not exist
//!   yet (create revision 0), so two nodes never hold one CIDR even when they
//!   start at the same moment. Claims are kept (no lease): a node that comes
//!   back gets its CIDR again.
//! - `nodes/<name>` = [`NodeRecord`] under a lease with a TTL, kept alive by
//!   the agent: when a node is gone for longer than the TTL, its key expires
//!   and every other agent's watch removes its routes.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use ipnet::Ipv4Net;

use super::{DatastoreError, JoinRequest, NodeRecord, first_free_cidr};

const CIDRS: &str = "/podnet/cidrs/";
const NODES: &str = "/podnet/nodes/";

#[allow(clippy::needless_pass_by_value, reason = "used as map_err(etcd_err)")]
fn etcd_err(e: etcd_client::Error) -> DatastoreError {
    DatastoreError::Etcd(e.to_string())
}

fn cidr_key(cidr: Ipv4Net) -> String {
    format!("{CIDRS}{}_{}", cidr.network(), cidr.prefix_len())
}

fn parse_cidr_key(key: &str) -> Option<Ipv4Net> {
    let (net, prefix) = key.strip_prefix(CIDRS)?.split_once('_')?;
    Ipv4Net::new(net.parse().ok()?, prefix.parse().ok()?).ok()
}

/// A connection to the etcd cluster.
#[derive(Clone)]
pub struct EtcdDatastore {
    client: Client,
    lease_ttl: i64,
}

impl EtcdDatastore {
    /// Connects (with a short timeout: the caller retries with backoff).
    pub async fn connect(
        endpoints: &[String],
        lease_ttl: Duration,
    ) -> Result<Self, DatastoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(etcd_err)?;
        Ok(Self {
            client,
            lease_ttl: i64::try_from(lease_ttl.as_secs()).unwrap_or(30).max(2),
        })
    }

    async fn claims(&mut self) -> Result<Vec<(Ipv4Net, String)>, DatastoreError> {
        let response = self
            .client
            .get(CIDRS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
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
        let response = self.client.txn(txn).await.map_err(etcd_err)?;
        if response.succeeded() {
            return Ok(true);
        }
        // Already claimed: ours (a restart) or someone else's.
        let holder = response.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
            _ => None,
        });
        Ok(holder.as_deref() == Some(name))
    }

    /// Takes (or gets back) this node's pod CIDR and publishes its record
    /// under a fresh lease; returns the CIDR and the lease ID.
    pub async fn join(&mut self, request: &JoinRequest) -> Result<(Ipv4Net, i64), DatastoreError> {
        let cidr = self.claim_cidr(request).await?;
        let lease = self.publish(request, cidr).await?;
        Ok((cidr, lease))
    }

    async fn claim_cidr(&mut self, request: &JoinRequest) -> Result<Ipv4Net, DatastoreError> {
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
            let candidate = first_free_cidr(request.cluster_cidr, request.node_prefix, &taken)?;
            if self.claim(candidate, &request.name).await? {
                return Ok(candidate);
            }
            // Lost a race for it: look again.
        }
    }

    /// Writes this node's record under a new lease; returns the lease ID.
    pub async fn publish(
        &mut self,
        request: &JoinRequest,
        cidr: Ipv4Net,
    ) -> Result<i64, DatastoreError> {
        let lease = self
            .client
            .lease_grant(self.lease_ttl, None)
            .await
            .map_err(etcd_err)?
            .id();
        let record = NodeRecord {
            name: request.name.clone(),
            node_ip: request.node_ip,
            pod_cidr: cidr,
        };
        let value =
            serde_json::to_string(&record).map_err(|e| DatastoreError::Etcd(e.to_string()))?;
        self.client
            .put(
                format!("{NODES}{}", request.name),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(etcd_err)?;
        Ok(lease)
    }

    /// Keeps `lease` alive until it fails (etcd gone, or the lease expired).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<(), DatastoreError> {
        let (mut keeper, mut responses) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(etcd_err)?;
        let period = Duration::from_secs(u64::try_from(self.lease_ttl / 3).unwrap_or(1).max(1));
        loop {
            keeper.keep_alive().await.map_err(etcd_err)?;
            match responses.message().await.map_err(etcd_err)? {
                Some(response) if response.ttl() > 0 => {}
                _ => return Err(DatastoreError::Etcd(format!("lease {lease:x} expired"))),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Every live node and the revision of that snapshot.
    pub async fn nodes(&mut self) -> Result<(Vec<NodeRecord>, i64), DatastoreError> {
        let response = self
            .client
            .get(NODES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
        let revision = response
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let nodes = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        Ok((nodes, revision))
    }

    /// Waits for the next change under the nodes prefix after `revision`.
    pub async fn wait_change(&mut self, revision: i64) -> Result<(), DatastoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = self
            .client
            .watch(NODES, Some(options))
            .await
            .map_err(etcd_err)?;
        loop {
            match stream.message().await.map_err(etcd_err)? {
                Some(response) if !response.events().is_empty() => return Ok(()),
                Some(_) => {}
                None => return Err(DatastoreError::Etcd("watch closed".into())),
            }
        }
    }
}
