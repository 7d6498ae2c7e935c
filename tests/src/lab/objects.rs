//! The lab's cluster objects: `podnetctl apply|delete|get` against the
//! lab's datastore with the operator's credential, as an operator runs it
//! against a real cluster (`podnet-lab apply|delete|get`).

use std::process::Command;

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
}
