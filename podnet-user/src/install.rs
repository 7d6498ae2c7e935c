//! `podnetd install-cni`: puts the CNI plugin and its network configuration
//! where container runtimes look for them (`/opt/cni/bin/podnet`,
//! `/etc/cni/net.d/10-podnet.conflist`).
//!
//! Both files are replaced atomically: the new content goes to a temporary
//! file in the target's own directory (same filesystem), is fsynced, gets
//! its mode and is renamed over the target, and the directory is fsynced
//! after. A runtime that reads the conf or executes the plugin at that
//! moment sees the old file or the new one, never half of one, and a
//! running plugin is never written to (no `ETXTBSY`). A file whose bytes
//! and mode are already right is left alone, mtime included: runtimes watch
//! the conf directory, and an install on every agent start must not look
//! like a new network. The plugin goes first: once the conf is there a
//! runtime takes the node's network as ready and calls the plugin.

use std::{
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::api::DEFAULT_SOCKET;

/// Where runtimes look for CNI plugins (the CNI convention, `CNI_PATH`).
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// Where runtimes look for network configurations.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The plugin's file name in the bin dir: the conf's `"type"`.
pub const PLUGIN_FILE: &str = "podnet";
/// The conf's file name: `10-` sorts it before most others (a runtime uses
/// the first conf of the directory).
pub const CONFLIST_FILE: &str = "10-podnet.conflist";
/// The network's name in the conf.
pub const NETWORK_NAME: &str = "podnet";
/// The plugin's mode: executable by everyone, written by root only.
pub const PLUGIN_MODE: u32 = 0o755;
/// The conf's mode.
pub const CONFLIST_MODE: u32 = 0o644;
/// Temporary files are `.<target name>.tmp-<pid>`: hidden, and no runtime
/// reads them as a conf (those end in `.conf`, `.conflist` or `.json`).
const TEMP_INFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading the CNI plugin {path}")]
    ReadPlugin { path: PathBuf, source: io::Error },
    #[error("the CNI plugin {path} is not a regular file")]
    PluginNotAFile { path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("rendering the network configuration")]
    Render(#[from] serde_json::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Content and mode were already right; the file was not touched.
    Unchanged,
    /// The file was (re)placed.
    Written,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Written => "written",
        })
    }
}

/// What to install where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// The plugin binary to copy.
    pub plugin_source: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// The agent's socket as the plugin sees it (`agentSocket`).
    pub agent_socket: PathBuf,
    /// Pod MTU for the conf; `None` leaves it to the agent (its default
    /// follows the underlay and the mode, which a fixed number would not).
    pub mtu: Option<u32>,
}

impl InstallOptions {
    /// The conventional directories and socket, with the plugin from
    /// `plugin_source`.
    #[must_use]
    pub fn new(plugin_source: PathBuf) -> Self {
        Self {
            plugin_source,
            cni_bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            cni_conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            agent_socket: DEFAULT_SOCKET.into(),
            mtu: None,
        }
    }
}

/// One installed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    pub outcome: Outcome,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.outcome)
    }
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    pub plugin: Installed,
    pub conflist: Installed,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: &'a str,
    name: &'a str,
    plugins: (PodnetPlugin<'a>, PortmapPlugin),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodnetPlugin<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    agent_socket: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    capabilities: Bandwidth,
}

#[derive(Serialize)]
struct Bandwidth {
    bandwidth: bool,
}

#[derive(Serialize)]
struct PortmapPlugin {
    #[serde(rename = "type")]
    kind: &'static str,
    capabilities: PortMappings,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortMappings {
    port_mappings: bool,
}

/// The network configuration list: podnet (with the `bandwidth`
/// capability: podnet shapes itself) chained before the reference
/// `portmap` plugin (hostPorts), as README's example. Deterministic bytes,
/// so an unchanged conf compares equal.
pub fn conflist(agent_socket: &Path, mtu: Option<u32>) -> Result<Vec<u8>, InstallError> {
    let conf = Conflist {
        cni_version: crate::cni::version::CURRENT,
        name: NETWORK_NAME,
        plugins: (
            PodnetPlugin {
                kind: PLUGIN_FILE,
                agent_socket,
                mtu,
                capabilities: Bandwidth { bandwidth: true },
            },
            PortmapPlugin {
                kind: "portmap",
                capabilities: PortMappings {
                    port_mappings: true,
                },
            },
        ),
    };
    let mut bytes = serde_json::to_vec_pretty(&conf)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Installs the plugin, then the conf (see the module doc for the order).
pub fn install(options: &InstallOptions) -> Result<InstallReport, InstallError> {
    let source = &options.plugin_source;
    let meta = fs::metadata(source).map_err(|e| InstallError::ReadPlugin {
        path: source.clone(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(InstallError::PluginNotAFile {
            path: source.clone(),
        });
    }
    let plugin = fs::read(source).map_err(|e| InstallError::ReadPlugin {
        path: source.clone(),
        source: e,
    })?;
    let plugin = replace_if_changed(&options.cni_bin_dir, PLUGIN_FILE, &plugin, PLUGIN_MODE)?;
    let conf = conflist(&options.agent_socket, options.mtu)?;
    let conflist = replace_if_changed(&options.cni_conf_dir, CONFLIST_FILE, &conf, CONFLIST_MODE)?;
    Ok(InstallReport { plugin, conflist })
}

/// Makes `dir/name` hold `content` with `mode`, atomically, and only when
/// it does not already (then the file is not touched at all).
pub fn replace_if_changed(
    dir: &Path,
    name: &str,
    content: &[u8],
    mode: u32,
) -> Result<Installed, InstallError> {
    replace_with(dir, name, content, mode, |file| file.write_all(content))
}

/// [`replace_if_changed`] with the temporary file filled by `fill` (tests
/// make it fail half-way).
fn replace_with(
    dir: &Path,
    name: &str,
    content: &[u8],
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<Installed, InstallError> {
    let path = dir.join(name);
    if is_current(&path, content, mode)? {
        return Ok(Installed {
            path,
            outcome: Outcome::Unchanged,
        });
    }
    fs::create_dir_all(dir).map_err(io_err("creating the directory", dir))?;
    remove_stale_temps(dir, name)?;
    let temp = dir.join(format!(".{name}{TEMP_INFIX}{}", std::process::id()));
    let published = (|| {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(io_err("creating the temporary file", &temp))?;
        fill(&mut out).map_err(io_err("writing the temporary file", &temp))?;
        // The umask may have taken bits off the mode given at creation.
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("setting the mode of", &temp))?;
        out.sync_all()
            .map_err(io_err("syncing the temporary file", &temp))?;
        drop(out);
        fs::rename(&temp, &path).map_err(io_err("publishing", &path))
    })();
    if let Err(e) = published {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the directory", dir))?;
    Ok(Installed {
        path,
        outcome: Outcome::Written,
    })
}

/// True when `path` is a regular file with exactly `content` and `mode`.
fn is_current(path: &Path, content: &[u8], mode: u32) -> Result<bool, InstallError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("inspecting", path)(e)),
    };
    if !meta.is_file()
        || meta.permissions().mode() & 0o7777 != mode
        || meta.len() != content.len() as u64
    {
        return Ok(false);
    }
    let current = fs::read(path).map_err(io_err("reading", path))?;
    Ok(current == content)
}

/// Removes temporary files an interrupted install of `name` left in `dir`.
fn remove_stale_temps(dir: &Path, name: &str) -> Result<(), InstallError> {
    let prefix = format!(".{name}{TEMP_INFIX}");
    let entries = fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("removing the stale temporary file", &path)(e));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// A directory removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("podnet-install-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A plugin source and options pointing at directories under `tmp`
    /// that do not exist yet (install creates them).
    fn setup(tmp: &TempDir, plugin: &[u8]) -> InstallOptions {
        let source = tmp.0.join("build/podnet");
        fs::create_dir_all(source.parent().unwrap()).unwrap();
        fs::write(&source, plugin).unwrap();
        // The build's mode must not matter: the installed plugin is 0755.
        fs::set_permissions(&source, fs::Permissions::from_mode(0o700)).unwrap();
        InstallOptions {
            cni_bin_dir: tmp.0.join("opt/cni/bin"),
            cni_conf_dir: tmp.0.join("etc/cni/net.d"),
            ..InstallOptions::new(source)
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn mtime(path: &Path) -> SystemTime {
        fs::metadata(path).unwrap().modified().unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn first_run_writes_both_files_with_their_modes() {
        let tmp = TempDir::new("first");
        let options = setup(&tmp, b"plugin v1");
        let report = install(&options).unwrap();
        let plugin = options.cni_bin_dir.join("podnet");
        let conf = options.cni_conf_dir.join("10-podnet.conflist");
        assert_eq!(
            report.plugin,
            Installed {
                path: plugin.clone(),
                outcome: Outcome::Written
            }
        );
        assert_eq!(report.conflist.path, conf);
        assert_eq!(report.conflist.outcome, Outcome::Written);
        assert_eq!(fs::read(&plugin).unwrap(), b"plugin v1");
        assert_eq!(mode(&plugin), 0o755);
        assert_eq!(mode(&conf), 0o644);
        assert_eq!(
            fs::read(&conf).unwrap(),
            conflist(Path::new(DEFAULT_SOCKET), None).unwrap()
        );
        // Nothing else is left behind.
        assert_eq!(entries(&options.cni_bin_dir), ["podnet"]);
        assert_eq!(entries(&options.cni_conf_dir), ["10-podnet.conflist"]);
        assert_eq!(
            report.plugin.to_string(),
            format!("{}: written", plugin.display())
        );
    }

    #[test]
    fn second_run_reports_unchanged_and_touches_nothing() {
        let tmp = TempDir::new("second");
        let options = setup(&tmp, b"plugin v1");
        install(&options).unwrap();
        let plugin = options.cni_bin_dir.join("podnet");
        let conf = options.cni_conf_dir.join("10-podnet.conflist");
        // Back-date both files: a rewrite would give them the current time,
        // however coarse the filesystem's timestamps.
        let old = SystemTime::now() - Duration::from_hours(1);
        for path in [&plugin, &conf] {
            fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let (plugin_ino, conf_ino) = (ino(&plugin), ino(&conf));

        let report = install(&options).unwrap();
        assert_eq!(report.plugin.outcome, Outcome::Unchanged);
        assert_eq!(report.conflist.outcome, Outcome::Unchanged);
        assert_eq!(
            report.conflist.to_string(),
            format!("{}: unchanged", conf.display())
        );
        assert_eq!(mtime(&plugin), old);
        assert_eq!(mtime(&conf), old);
        assert_eq!(ino(&plugin), plugin_ino, "the plugin was replaced");
        assert_eq!(ino(&conf), conf_ino, "the conf was replaced");
    }

    #[test]
    fn changed_content_or_mode_is_rewritten() {
        let tmp = TempDir::new("changed");
        let mut options = setup(&tmp, b"plugin v1");
        install(&options).unwrap();
        let plugin = options.cni_bin_dir.join("podnet");
        let conf = options.cni_conf_dir.join("10-podnet.conflist");

        // A new plugin build; the conf stays.
        fs::write(&options.plugin_source, b"plugin v2").unwrap();
        let report = install(&options).unwrap();
        assert_eq!(report.plugin.outcome, Outcome::Written);
        assert_eq!(report.conflist.outcome, Outcome::Unchanged);
        assert_eq!(fs::read(&plugin).unwrap(), b"plugin v2");
        assert_eq!(mode(&plugin), 0o755);

        // Another MTU and socket change the conf only.
        options.mtu = Some(1450);
        options.agent_socket = "/run/other/podnetd.sock".into();
        let report = install(&options).unwrap();
        assert_eq!(report.plugin.outcome, Outcome::Unchanged);
        assert_eq!(report.conflist.outcome, Outcome::Written);
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
        assert_eq!(written["plugins"][0]["mtu"], 1450);
        assert_eq!(
            written["plugins"][0]["agentSocket"],
            "/run/other/podnetd.sock"
        );

        // Same bytes but a wrong mode (someone chmod'ed it) is repaired.
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o600)).unwrap();
        let report = install(&options).unwrap();
        assert_eq!(report.plugin.outcome, Outcome::Written);
        assert_eq!(mode(&plugin), 0o755);

        // Someone edited the conf by hand: it is put back.
        fs::write(&conf, b"{}").unwrap();
        assert_eq!(
            install(&options).unwrap().conflist.outcome,
            Outcome::Written
        );
        assert_eq!(
            fs::read(&conf).unwrap(),
            conflist(Path::new("/run/other/podnetd.sock"), Some(1450)).unwrap()
        );
    }

    #[test]
    fn a_partial_temporary_file_never_becomes_the_visible_file() {
        let tmp = TempDir::new("partial");
        let options = setup(&tmp, b"plugin v1");
        install(&options).unwrap();
        let dir = &options.cni_bin_dir;
        let plugin = dir.join("podnet");

        // The write of the new content fails half-way (disk full, killed):
        // the old plugin stays whole and the half is removed.
        let new = b"plugin v2, a longer build";
        let err = replace_with(dir, PLUGIN_FILE, new, PLUGIN_MODE, |file| {
            file.write_all(&new[..5])?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::Io {
                    what: "writing the temporary file",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fs::read(&plugin).unwrap(), b"plugin v1");
        assert_eq!(entries(dir), ["podnet"]);

        // An install killed before its rename leaves its temporary file:
        // the next install neither publishes nor keeps it.
        let stale = dir.join(".podnet.tmp-4242");
        fs::write(&stale, b"plu").unwrap();
        fs::write(&options.plugin_source, new).unwrap();
        assert_eq!(install(&options).unwrap().plugin.outcome, Outcome::Written);
        assert_eq!(fs::read(&plugin).unwrap(), new);
        assert_eq!(entries(dir), ["podnet"]);
    }

    #[test]
    fn a_missing_or_odd_plugin_source_is_an_error_and_installs_nothing() {
        let tmp = TempDir::new("source");
        let mut options = setup(&tmp, b"x");
        options.plugin_source = tmp.0.join("nope");
        assert!(matches!(
            install(&options),
            Err(InstallError::ReadPlugin { .. })
        ));
        options.plugin_source = tmp.0.clone();
        assert!(matches!(
            install(&options),
            Err(InstallError::PluginNotAFile { .. })
        ));
        // No conf without its plugin: a runtime would call a missing binary.
        assert!(!options.cni_conf_dir.exists());
        assert!(!options.cni_bin_dir.exists());
    }

    /// The conf equals README's example (with the example's MTU): the
    /// example documents what install-cni writes.
    #[test]
    fn conflist_is_readmes_example() {
        let readme = include_str!("../../README.md");
        let anchor = "(`podnetd install-cni --mtu 1500` writes";
        let after =
            &readme[readme.find(anchor).expect("README names the conflist") + anchor.len()..];
        let start = after.find("```json\n").expect("a JSON block follows") + "```json\n".len();
        let end = start + after[start..].find("```").expect("the block ends");
        let example: serde_json::Value = serde_json::from_str(&after[start..end]).unwrap();
        let ours: serde_json::Value =
            serde_json::from_slice(&conflist(Path::new(DEFAULT_SOCKET), Some(1500)).unwrap())
                .unwrap();
        assert_eq!(ours, example);
        // Without an MTU the key is left out (the agent's default applies).
        let default: serde_json::Value =
            serde_json::from_slice(&conflist(Path::new(DEFAULT_SOCKET), None).unwrap()).unwrap();
        assert!(default["plugins"][0].get("mtu").is_none());
        assert_eq!(default["plugins"][1], example["plugins"][1]);
    }

    /// The plugin reads its entry of the written conf the way a runtime
    /// hands it over (the list's cniVersion and name added).
    #[test]
    fn the_plugin_accepts_its_entry_of_the_conf() {
        let conf: serde_json::Value = serde_json::from_slice(
            &conflist(Path::new("/run/x/podnetd.sock"), Some(1400)).unwrap(),
        )
        .unwrap();
        let mut entry = conf["plugins"][0].clone();
        entry["cniVersion"] = conf["cniVersion"].clone();
        entry["name"] = conf["name"].clone();
        let parsed =
            crate::cni::config::NetConf::parse(&serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(parsed.plugin_type, PLUGIN_FILE);
        assert_eq!(parsed.name, NETWORK_NAME);
        assert_eq!(parsed.cni_version, crate::cni::version::CURRENT);
        assert_eq!(parsed.agent_socket, Path::new("/run/x/podnetd.sock"));
        assert_eq!(parsed.mtu, Some(1400));
    }
}
