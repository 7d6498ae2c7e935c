//! The lab's cluster objects: `podnetctl apply|delete|get` against the
//! lab's datastore with the operator's credential, as an operator runs it
//! against a real cluster (`podnet-lab apply|delete|get`).

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use podnet::datastore::etcd::OPERATOR_USER;

use super::model::{LabDatastore, LabLayout};
use crate::{bins, netns::command_in};

impl LabLayout {
    /// `podnetctl <args>` pointed at the lab's datastore: the nodes file of
    /// a file-datastore lab; for etcd, the members' URLs, run in the fabric
    /// namespace (where etcd listens) and, with `--etcd-tls`, the
    /// operator's client certificate (common name podnet-operator, made on
    /// first use; `lab up` made its user and role). Never a node's: nodes
    /// may not write cluster objects.
    pub fn podnetctl_objects(&self, args: &[String]) -> anyhow::Result<Command> {
        let podnetctl = bins::binary_in(self.bin_dir.as_deref(), "podnetctl");
        let mut command = match self.datastore {
            LabDatastore::File => {
                let mut command = Command::new(podnetctl);
                command.args(args).arg(format!(
                    "--datastore=file:{}",
                    self.run_dir.join("nodes.json").display()
                ));
                command
            }
            LabDatastore::Etcd => {
                let mut command = command_in(&self.fabric_netns, podnetctl)?;
                command.args(args).arg(format!(
                    "--datastore=etcd:{}",
                    self.etcd_endpoints().join(",")
                ));
                if self.etcd_tls {
                    let pki = self.etcd_pki();
                    let (cert, key) = pki.client(OPERATOR_USER);
                    if !cert.exists() {
                        pki.issue(OPERATOR_USER)
                            .context("making the operator's etcd certificate")?;
                    }
                    command.args([
                        format!("--etcd-ca={}", pki.ca().display()),
                        format!("--etcd-cert={}", cert.display()),
                        format!("--etcd-key={}", key.display()),
                    ]);
                }
                command
            }
        };
        // The lab's datastore, not whatever the caller's shell points at.
        command.env_remove("PODNET_DATASTORE");
        Ok(command)
    }

    /// The upstream NetworkPolicy e2e suite's model: namespaces x, y, z
    /// with pods a, b, c in each, spread over the nodes in turn; then
    /// described to the datastore ([`Self::describe_pods`]).
    pub fn add_e2e_model(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.nodes.is_empty(), "the e2e model needs a node");
        let mut i = 0;
        for namespace in E2E_NAMESPACES {
            for name in E2E_PODS {
                let node = self.nodes[i % self.nodes.len()].name.clone();
                self.add_pod_in(
                    &node,
                    &format!("{namespace}-{name}"),
                    (namespace, name),
                    &serde_json::Value::Null,
                )?;
                i += 1;
            }
        }
        self.describe_pods()
    }

    /// Applies a Namespace for each namespace of the lab's pods and a Pod
    /// object for each pod, labelled as the e2e model labels them
    /// (namespaces `ns: <name>` and `kubernetes.io/metadata.name`, which
    /// the API server sets; pods `pod: <name>`) with the model's serving
    /// ports (80 and 81, TCP and UDP, named `serve-<port>-<protocol>`), so
    /// `podnetctl get pods -o wide` shows their labels beside the node and
    /// address the agents publish.
    pub fn describe_pods(&self) -> anyhow::Result<()> {
        let namespaces: BTreeSet<&str> = self
            .pods
            .iter()
            .map(super::model::LabPod::k8s_namespace)
            .collect();
        let mut items: Vec<serde_json::Value> = namespaces
            .iter()
            .map(|ns| {
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {"ns": ns, "kubernetes.io/metadata.name": ns}},
                })
            })
            .collect();
        let ports: Vec<serde_json::Value> = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]
            .iter()
            .map(|(port, protocol)| {
                serde_json::json!({
                    "name": format!("serve-{port}-{}", protocol.to_lowercase()),
                    "containerPort": port,
                    "protocol": protocol,
                })
            })
            .collect();
        items.extend(self.pods.iter().map(|pod| {
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": pod.k8s_namespace(),
                    "name": pod.k8s_name(),
                    "labels": {"pod": pod.k8s_name()},
                },
                "spec": {"containers": [{"name": "cont", "image": "lab", "ports": ports}]},
            })
        }));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let mut child = self
            .podnetctl_objects(&["apply".to_owned(), "-f".to_owned(), "-".to_owned()])?
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running podnetctl apply")?;
        child
            .stdin
            .take()
            .context("podnetctl's stdin")?
            .write_all(list.to_string().as_bytes())
            .context("writing the lab's objects")?;
        let output = child.wait_with_output().context("podnetctl apply")?;
        anyhow::ensure!(
            output.status.success(),
            "podnetctl apply of the lab's pods: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// The e2e model's namespaces and pods (kubernetes/test/e2e/network/netpol).
pub const E2E_NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const E2E_PODS: [&str; 3] = ["a", "b", "c"];
