//! The lab's cluster objects: `podnetctl apply|delete|get` against the
//! lab's datastore with the operator's credential, as an operator runs it
//! against a real cluster (`podnet-lab apply|delete|get`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use podnet::datastore::etcd::OPERATOR_USER;

use super::model::{LabDatastore, LabLayout, LabPod};
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
    /// described to the datastore ([`Self::describe_pods`]), and each pod
    /// serving TCP and UDP on 80 and 81 ([`Self::start_e2e_servers`]).
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
        self.describe_pods()?;
        self.start_e2e_servers()
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
            .map(|ns| Self::namespace_object(ns, &BTreeMap::new()))
            .collect();
        items.extend(
            self.pods
                .iter()
                .map(|pod| Self::pod_object(pod, &BTreeMap::new())),
        );
        self.apply_objects(&items)
    }

    /// The Namespace `name` with the model's labels (`ns: <name>`,
    /// `kubernetes.io/metadata.name: <name>`) and `extra` (which may
    /// replace `ns`).
    #[must_use]
    pub fn namespace_object(name: &str, extra: &BTreeMap<String, String>) -> serde_json::Value {
        let mut labels = BTreeMap::from([
            ("ns".to_owned(), name.to_owned()),
            ("kubernetes.io/metadata.name".to_owned(), name.to_owned()),
        ]);
        labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        })
    }

    /// The Pod object of `pod` with the model's label (`pod: <name>`) and
    /// `extra` (which may replace it), serving ports 80 and 81 on TCP and
    /// UDP, named `serve-<port>-<protocol>`.
    #[must_use]
    pub fn pod_object(pod: &LabPod, extra: &BTreeMap<String, String>) -> serde_json::Value {
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
        let mut labels = BTreeMap::from([("pod".to_owned(), pod.k8s_name().to_owned())]);
        labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "namespace": pod.k8s_namespace(),
                "name": pod.k8s_name(),
                "labels": labels,
            },
            "spec": {"containers": [{"name": "cont", "image": "lab", "ports": ports}]},
        })
    }

    /// `podnetctl apply -f -` of `items` (as a List) on the lab's datastore.
    pub fn apply_objects(&self, items: &[serde_json::Value]) -> anyhow::Result<()> {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        self.podnetctl_stdin("apply", &list.to_string())
    }

    /// `podnetctl <verb> -f -` (apply or delete) with `text` (YAML or JSON)
    /// on stdin, on the lab's datastore; an error carries its stderr.
    pub fn podnetctl_stdin(&self, verb: &str, text: &str) -> anyhow::Result<()> {
        let mut child = self
            .podnetctl_objects(&[verb.to_owned(), "-f".to_owned(), "-".to_owned()])?
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running podnetctl {verb}"))?;
        child
            .stdin
            .take()
            .context("podnetctl's stdin")?
            .write_all(text.as_bytes())
            .context("writing the objects")?;
        let output = child
            .wait_with_output()
            .with_context(|| format!("podnetctl {verb}"))?;
        anyhow::ensure!(
            output.status.success(),
            "podnetctl {verb}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// The e2e model's namespaces and pods (kubernetes/test/e2e/network/netpol).
pub const E2E_NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const E2E_PODS: [&str; 3] = ["a", "b", "c"];
