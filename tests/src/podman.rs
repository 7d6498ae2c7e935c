//! podman 4 as the container runtime in front of podnet: its CNI backend
//! (libcni) reads a conflist from a private network config dir and runs
//! the plugin from this build's binary dir, inside a node's netns. Storage,
//! config and image (a busybox rootfs imported offline) are private to the
//! fixture; every container is removed on drop, even after a failure.

use std::{
    path::Path,
    process::{Command, Output},
};

use anyhow::Context as _;

use crate::{bins, netns::command_in, node::TempDir};

/// The image every fixture imports: busybox-static as the only file.
pub const IMAGE: &str = "localhost/podnet-test-busybox";

/// podman's default rlimits are refused in this sandbox; these are not.
pub const RLIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Whether `program --version` runs.
#[must_use]
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// podman with private storage and config, run in one netns.
pub struct Podman {
    netns: String,
    dir: TempDir,
}

impl Podman {
    /// podman in `netns` whose only network is `conflist` (its `name` is
    /// what `--network` takes), with the image imported.
    pub fn new(tag: &str, netns: &str, conflist: &serde_json::Value) -> anyhow::Result<Self> {
        let podman = Self {
            netns: netns.to_owned(),
            dir: TempDir::new(tag)?,
        };
        let d = podman.dir.path();
        std::fs::create_dir_all(d.join("rootfs/bin"))?;
        std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox"))
            .context("busybox-static is installed (cargo xtask setup)")?;
        crate::netns::run(
            Command::new("tar")
                .arg("-C")
                .arg(d.join("rootfs"))
                .arg("-cf")
                .arg(d.join("rootfs.tar"))
                .arg("."),
        )?;
        // CNI backend with podnet's binary dir first, the conflist in our dir.
        let bin_dir = bins::binary("podnet")
            .parent()
            .context("bin dir")?
            .to_path_buf();
        std::fs::create_dir_all(d.join("net.d"))?;
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin_dir.display(),
                d.join("net.d").display()
            ),
        )?;
        std::fs::write(d.join("net.d/podnet.conflist"), conflist.to_string())?;
        podman.run(&["import", &d.join("rootfs.tar").display().to_string(), IMAGE])?;
        Ok(podman)
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `podman` with this fixture's storage and config, in its netns.
    pub fn command(&self) -> anyhow::Result<Command> {
        let d = self.dir.path();
        let mut cmd = command_in(&self.netns, "podman")?;
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs"]);
        Ok(cmd)
    }

    /// Runs `podman <args>`; fails on a non-zero exit, with its output.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        crate::netns::run(self.command()?.args(args))
    }

    /// IDs of the running containers.
    pub fn running(&self) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["ps", "--quiet", "--no-trunc"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Ok(mut cmd) = self.command() {
            let _ = cmd.args(["rm", "--all", "--force", "--time", "0"]).output();
        }
    }
}
