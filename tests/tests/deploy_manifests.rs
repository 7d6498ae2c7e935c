//! The deploy files against the binaries' own definitions. No Kubernetes API
//! server and no systemd run here, so `deploy/kubernetes/podnet.yaml` and
//! `deploy/podnetd.service` are parsed and cross-checked instead: every
//! podnetd flag they use is in the built podnetd's `--help` (or
//! `install-cni --help`), every path the binaries use by default is a host
//! path mounted at itself, the plugin's socket is the agent's, the probes
//! hit the metrics address given on the command line, the init container
//! installs the CNI files, the etcd endpoints come from the ConfigMap key
//! the container reads, and the rules an API server would enforce on these
//! fields hold. Not privileged: it runs the binaries with `--help` only.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use podnet::{
    agent::DEFAULT_STATE_DIR,
    api::DEFAULT_SOCKET,
    bpffs::{DEFAULT_BPFFS, DEFAULT_PIN_DIR},
    cni::plugin::DEFAULT_IPAM_DIR,
    datastore::DatastoreSpec,
    install::{DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR},
};
use serde::Deserialize as _;
use serde_json::Value;

/// The host paths the DaemonSet may mount, no more: the CNI directories,
/// bpffs, the socket's directory and the state directory.
const HOST_PATHS: [&str; 6] = [
    DEFAULT_CNI_BIN_DIR,
    DEFAULT_CNI_CONF_DIR,
    DEFAULT_BPFFS,
    "/run/podnet",
    DEFAULT_STATE_DIR,
    // The node's own etcd client certificate and key.
    "/etc/podnet/etcd",
];

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The long flags a clap `--help` lists (`  -h, --help`,
/// `      --cni-bin-dir <CNI_BIN_DIR>`), not those its descriptions mention.
fn help_flags(subcommand: Option<&str>) -> BTreeSet<String> {
    let mut cmd = Command::new(podnet_tests::bins::binary("podnetd"));
    cmd.args(subcommand).arg("--help");
    let out = cmd.output().expect("running podnetd --help");
    assert!(
        out.status.success(),
        "podnetd {subcommand:?} --help: {out:?}"
    );
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let mut flags = BTreeSet::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        for word in line.split_whitespace() {
            if let Some(flag) = word.strip_prefix("--") {
                flags.insert(format!("--{}", flag.trim_end_matches(',')));
                break;
            }
            if !word.starts_with('-') {
                break;
            }
        }
    }
    assert!(flags.contains("--help"), "no flags found in:\n{help}");
    flags
}

/// A command line's flags and their values: `--a=b`, `--a b` and `--a`.
fn parse_flags(line: &[String]) -> BTreeMap<String, Option<String>> {
    let mut flags = BTreeMap::new();
    let mut words = line.iter().peekable();
    while let Some(word) = words.next() {
        let Some(_) = word.strip_prefix("--") else {
            continue;
        };
        let (flag, value) = match word.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (
                word.clone(),
                words.next_if(|next| !next.starts_with('-')).cloned(),
            ),
        };
        assert!(
            flags.insert(flag.clone(), value).is_none(),
            "{flag} given twice in {line:?}"
        );
    }
    flags
}

/// Every flag in `used` exists in podnetd's (sub)command; `what` names the
/// command line in the message.
fn check_flags(used: &BTreeMap<String, Option<String>>, subcommand: Option<&str>, what: &str) {
    let known = help_flags(subcommand);
    for flag in used.keys() {
        assert!(
            known.contains(flag),
            "{what} uses {flag}, which `podnetd {}--help` does not list: {known:?}",
            subcommand.map(|s| format!("{s} ")).unwrap_or_default()
        );
    }
}

/// The `--metrics-addr` value of a command line (variables expanded).
fn metrics_addr(flags: &BTreeMap<String, Option<String>>, what: &str) -> String {
    flags
        .get("--metrics-addr")
        .and_then(Clone::clone)
        .unwrap_or_else(|| panic!("{what} has no --metrics-addr value"))
}

/// The port of a metrics address `<host>:<port>`, whose host is checked by
/// the caller.
fn metrics_port(addr: &str, what: &str) -> u16 {
    let (_, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{what}: --metrics-addr {addr} has no port"));
    port.parse()
        .unwrap_or_else(|e| panic!("{what}: --metrics-addr {addr}: {e}"))
}

// ---------------------------------------------------------------- systemd

/// A unit file's settings by section, in order (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "continuation lines are not parsed here: {line}"
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_owned());
            continue;
        }
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("{line} before any section"));
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        sections
            .entry(section)
            .or_default()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    sections
}

fn unit_values<'a>(
    unit: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    unit.get(section)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// An Exec line's words, without systemd's prefixes (`-`, `@`, `+`, ...),
/// with `${VAR}` replaced by the unit's own `Environment=` value (the
/// default an `EnvironmentFile` may override) and without `$VAR` words
/// (the operator's extra arguments, split into words by systemd).
fn exec_words(line: &str, unit: &BTreeMap<String, Vec<(String, String)>>) -> Vec<String> {
    let env: BTreeMap<&str, &str> = unit_values(unit, "Service", "Environment")
        .iter()
        .filter_map(|assignment| assignment.split_once('='))
        .collect();
    let line = line.trim_start_matches(['-', '@', '+', '!', ':']);
    line.split_whitespace()
        .filter(|w| !w.starts_with('$') || w.starts_with("${"))
        .map(|w| {
            w.strip_prefix("${")
                .and_then(|w| w.strip_suffix('}'))
                .map_or_else(
                    || w.to_owned(),
                    |var| {
                        (*env
                            .get(var)
                            .unwrap_or_else(|| panic!("${{{var}}} has no Environment= default")))
                        .to_owned()
                    },
                )
        })
        .collect()
}

#[test]
fn systemd_unit_installs_the_cni_files_then_runs_podnetd_with_real_flags() {
    let unit = parse_unit(&repo_file("deploy/podnetd.service"));

    let pre = unit_values(&unit, "Service", "ExecStartPre");
    assert_eq!(pre.len(), 1, "one ExecStartPre: {pre:?}");
    let pre = exec_words(pre[0], &unit);
    let start = unit_values(&unit, "Service", "ExecStart");
    assert_eq!(start.len(), 1, "one ExecStart: {start:?}");
    let start = exec_words(start[0], &unit);

    // The same podnetd both times, and the plugin is installed from next to
    // it (install-cni's default source): no --plugin-source pointing
    // elsewhere.
    assert!(start[0].ends_with("/podnetd"), "{start:?}");
    assert_eq!(pre[0], start[0]);
    assert_eq!(
        pre.get(1).map(String::as_str),
        Some("install-cni"),
        "{pre:?}"
    );
    let pre_flags = parse_flags(&pre[2..]);
    check_flags(&pre_flags, Some("install-cni"), "ExecStartPre");
    assert!(!pre_flags.contains_key("--plugin-source"));
    // The conf's agentSocket is where the agent listens.
    let agent_flags = parse_flags(&start[1..]);
    check_flags(&agent_flags, None, "ExecStart");
    assert_eq!(
        pre_flags.get("--socket").cloned().flatten(),
        agent_flags.get("--socket").cloned().flatten(),
        "the plugin's socket is the agent's"
    );
    assert!(!start.iter().any(|w| w == "install-cni" || w == "--once"));
    // Metrics and health on the node's loopback by default: a pod's
    // 127.0.0.1 is its own, so no pod reaches the port; an operator sets
    // the node's address in /etc/default/podnetd for an off-node scraper.
    let addr: SocketAddr = metrics_addr(&agent_flags, "ExecStart")
        .parse()
        .expect("the unit's default --metrics-addr is an address");
    assert!(
        addr.ip().is_loopback(),
        "metrics on {addr}, reachable from pods"
    );
    assert_eq!(addr.port(), 9962);
    let environment = unit_values(&unit, "Service", "Environment");
    let files = unit_values(&unit, "Service", "EnvironmentFile");
    assert_eq!(files, ["-/etc/default/podnetd"]);
    // The default comes before the file that may override it (systemd
    // applies Environment= and EnvironmentFile= in order).
    let settings = &unit["Service"];
    let position = |key: &str| settings.iter().position(|(k, _)| k == key);
    assert!(
        position("Environment") < position("EnvironmentFile"),
        "the default {environment:?} is read before /etc/default/podnetd"
    );

    assert_eq!(unit_values(&unit, "Service", "Restart"), ["always"]);
    let caps: BTreeSet<&str> = unit_values(&unit, "Service", "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    let needed = BTreeSet::from(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
    assert_eq!(caps, needed, "the capabilities podnetd needs, no more");
    assert_eq!(
        unit_values(&unit, "Install", "WantedBy"),
        ["multi-user.target"]
    );
}

// ------------------------------------------------------------- Kubernetes

struct Manifest {
    config_map: Value,
    daemon_set: Value,
}

fn load_manifest() -> Manifest {
    let text = repo_file("deploy/kubernetes/podnet.yaml");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .collect();
    let of_kind = |kind: &str| {
        let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in the manifest");
        found[0].clone()
    };
    let manifest = Manifest {
        config_map: of_kind("ConfigMap"),
        daemon_set: of_kind("DaemonSet"),
    };
    assert_eq!(docs.len(), 2, "nothing else in the manifest");
    for doc in [&manifest.config_map, &manifest.daemon_set] {
        assert_eq!(doc["metadata"]["namespace"], "kube-system");
    }
    assert_eq!(manifest.daemon_set["apiVersion"], "apps/v1");
    manifest
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array_of<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_array()
        .map_or_else(|| panic!("{what} is not a list: {v}"), Vec::as_slice)
}

/// The container's command line: command then args.
fn command_line(container: &Value) -> Vec<String> {
    let name = str_of(&container["name"], "container name");
    let mut words: Vec<String> = Vec::new();
    for key in ["command", "args"] {
        if !container[key].is_null() {
            words.extend(
                array_of(&container[key], key)
                    .iter()
                    .map(|w| str_of(w, name).to_owned()),
            );
        }
    }
    words
}

/// The host path a path inside `container` is (through its volume mounts
/// and the pod's hostPath volumes); `None`: not on a host path.
fn host_path(spec: &Value, container: &Value, inside: &Path) -> Option<PathBuf> {
    let mount = array_of(&container["volumeMounts"], "volumeMounts")
        .iter()
        .filter(|m| inside.starts_with(str_of(&m["mountPath"], "mountPath")))
        .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())?;
    let rest = inside
        .strip_prefix(str_of(&mount["mountPath"], "mountPath"))
        .ok()?;
    let volume = array_of(&spec["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    let host = str_of(&volume["hostPath"]["path"], "hostPath");
    Some(Path::new(host).join(rest))
}

/// Substitutes `$(VAR)` from the container's env: a ConfigMap key's value
/// (checked to exist) or a field reference's placeholder.
fn expand(value: &str, container: &Value, config_map: &Value) -> String {
    let mut out = value.to_owned();
    while let Some(start) = out.find("$(") {
        let end = start + out[start..].find(')').expect("closing )");
        let var = &out[start + 2..end];
        let env = array_of(&container["env"], "env")
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("$({var}) is not in the container's env"));
        let source = &env["valueFrom"];
        let replacement = if let Some(key_ref) = source.get("configMapKeyRef") {
            assert_eq!(
                key_ref["name"], config_map["metadata"]["name"],
                "$({var}) reads another ConfigMap"
            );
            let key = str_of(&key_ref["key"], "configMapKeyRef.key");
            str_of(&config_map["data"][key], &format!("ConfigMap key {key}")).to_owned()
        } else if let Some(field) = source.get("fieldRef") {
            let field = str_of(&field["fieldPath"], "fieldPath");
            assert!(
                ["spec.nodeName", "status.hostIP"].contains(&field),
                "$({var}) from {field}"
            );
            format!("<{field}>")
        } else {
            str_of(&env["value"], var).to_owned()
        };
        out.replace_range(start..=end, &replacement);
    }
    out
}

/// A path flag's value, else its default.
fn flag_or(flags: &BTreeMap<String, Option<String>>, flag: &str, default: &str) -> PathBuf {
    PathBuf::from(
        flags
            .get(flag)
            .cloned()
            .flatten()
            .unwrap_or_else(|| default.to_owned()),
    )
}

/// Each `(flag, default)`: the path `container` uses (the flag's value,
/// else the binary's default) is the host's `default`, through a mount.
fn assert_paths_on_host(
    spec: &Value,
    container: &Value,
    flags: &BTreeMap<String, Option<String>>,
    paths: &[(&str, &str)],
) {
    let name = str_of(&container["name"], "name");
    for &(flag, default) in paths {
        let inside = flag_or(flags, flag, default);
        assert_eq!(
            host_path(spec, container, &inside).as_deref(),
            Some(Path::new(default)),
            "{name} uses {} (its {flag}), which must be the host's {default}",
            inside.display()
        );
    }
}

#[test]
fn daemon_set_mounts_exactly_the_paths_the_binaries_use_by_default() {
    let m = load_manifest();
    let spec = &m.daemon_set["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    // The plugin, run by the runtime on the host, writes its IPAM store
    // under the agent's state dir by default: one mount covers both.
    assert!(Path::new(DEFAULT_IPAM_DIR).starts_with(DEFAULT_STATE_DIR));

    let volumes = array_of(&spec["volumes"], "volumes");
    let hosts: BTreeSet<&str> = volumes
        .iter()
        .filter(|v| v["secret"].is_null())
        .map(|v| str_of(&v["hostPath"]["path"], "every other volume is a hostPath"))
        .collect();
    assert_eq!(hosts, BTreeSet::from(HOST_PATHS));
    assert_eq!(
        Path::new(DEFAULT_SOCKET).parent(),
        Some(Path::new("/run/podnet"))
    );

    let init = array_of(&spec["initContainers"], "initContainers");
    assert_eq!(init.len(), 1);
    let install = &init[0];
    let install_line = command_line(install);
    assert!(install_line[0].ends_with("/podnetd"), "{install_line:?}");
    assert_eq!(install_line.get(1).map(String::as_str), Some("install-cni"));
    let install_flags = parse_flags(&install_line[2..]);
    check_flags(&install_flags, Some("install-cni"), "the init container");
    assert_paths_on_host(
        spec,
        install,
        &install_flags,
        &[
            ("--cni-bin-dir", DEFAULT_CNI_BIN_DIR),
            ("--cni-conf-dir", DEFAULT_CNI_CONF_DIR),
        ],
    );

    let containers = array_of(&spec["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    let line = command_line(agent);
    assert!(line[0].ends_with("/podnetd"), "{line:?}");
    assert!(!line.iter().any(|w| w == "install-cni" || w == "--once"));
    let flags = parse_flags(&line[1..]);
    check_flags(&flags, None, "the podnetd container");
    assert_paths_on_host(
        spec,
        agent,
        &flags,
        &[
            ("--bpffs-dir", DEFAULT_PIN_DIR),
            ("--state-dir", DEFAULT_STATE_DIR),
            ("--socket", DEFAULT_SOCKET),
        ],
    );
    // The plugin on the host connects where the agent listens.
    assert_eq!(
        host_path(spec, agent, &flag_or(&flags, "--socket", DEFAULT_SOCKET)),
        Some(flag_or(&install_flags, "--socket", DEFAULT_SOCKET)),
    );
    // The agent checks (and mounts when missing) bpffs at /sys/fs/bpf
    // itself, and that mount must reach the host.
    let bpffs_mount = array_of(&agent["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == DEFAULT_BPFFS)
        .expect("bpffs mounted at /sys/fs/bpf");
    assert_eq!(bpffs_mount["mountPropagation"], "Bidirectional");
}

#[test]
fn daemon_set_agent_flags_etcd_endpoints_and_probes_agree() {
    let m = load_manifest();
    let spec = &m.daemon_set["spec"]["template"]["spec"];
    let agent = &array_of(&spec["containers"], "containers")[0];
    let flags = parse_flags(&command_line(agent)[1..]);

    // etcd endpoints: the ConfigMap's key, through the container's env, into
    // a --datastore podnetd parses as etcd with every URL.
    let datastore = flags
        .get("--datastore")
        .cloned()
        .flatten()
        .expect("--datastore given");
    assert!(
        datastore.contains("$("),
        "--datastore comes from the ConfigMap: {datastore}"
    );
    let expanded = expand(&datastore, agent, &m.config_map);
    let urls: Vec<&str> = str_of(&m.config_map["data"]["etcd_endpoints"], "etcd_endpoints")
        .split(',')
        .collect();
    match expanded.parse::<DatastoreSpec>() {
        Ok(DatastoreSpec::Etcd(endpoints)) => assert_eq!(endpoints, urls),
        other => panic!("--datastore {expanded} is {other:?}"),
    }
    // Over TLS (issue 21: etcd in the clear let anyone who reached it
    // rewrite the cluster's routing): https:// endpoints, etcd's CA from
    // the Secret, the node's own client certificate and key from the host
    // (a Secret is the same for every node: one etcd user for all).
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
    let volume_of = |flag: &str| {
        let path = flags
            .get(flag)
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("{flag} given"));
        let mount = array_of(&agent["volumeMounts"], "volumeMounts")
            .iter()
            .find(|m| Path::new(&path).starts_with(str_of(&m["mountPath"], "mountPath")))
            .unwrap_or_else(|| panic!("{flag} {path} is mounted"));
        array_of(&spec["volumes"], "volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{flag}: a volume"))
            .clone()
    };
    assert_eq!(
        volume_of("--etcd-ca")["secret"]["secretName"],
        "podnet-etcd-ca"
    );
    for flag in ["--etcd-cert", "--etcd-key"] {
        assert_eq!(
            volume_of(flag)["hostPath"]["path"],
            "/etc/podnet/etcd",
            "{flag}"
        );
    }
    assert!(
        !flags.contains_key("--etcd-password"),
        "no password on a command line"
    );
    // Every other $(VAR) resolves too.
    for value in flags.values().flatten() {
        expand(value, agent, &m.config_map);
    }

    // Probes: /healthz and /readyz on the port --metrics-addr listens on,
    // which is the node's address (what the kubelet probes a hostNetwork
    // pod on, and Prometheus scrapes), not every address of the node.
    let addr = expand(
        &metrics_addr(&flags, "the podnetd container"),
        agent,
        &m.config_map,
    );
    let (host, _) = addr.rsplit_once(':').expect("host:port");
    assert_eq!(
        host, "<status.hostIP>",
        "--metrics-addr listens on the node's address from the downward API"
    );
    let port = metrics_port(&addr, "the podnetd container");
    let ports = array_of(&agent["ports"], "ports");
    let resolve = |probe_port: &Value| -> u64 {
        probe_port.as_u64().unwrap_or_else(|| {
            let named = ports
                .iter()
                .find(|p| p["name"] == *probe_port)
                .unwrap_or_else(|| panic!("no port named {probe_port}"));
            named["containerPort"].as_u64().expect("containerPort")
        })
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve(&get["port"]), u64::from(port), "{probe}");
        assert!(get["host"].is_null(), "{probe}: the node's address");
    }
    assert!(
        ports.iter().any(|p| p["containerPort"] == u64::from(port)),
        "the metrics port is declared"
    );
}

/// What an API server would refuse (no server runs here).
#[test]
fn daemon_set_passes_the_api_servers_own_rules() {
    let m = load_manifest();
    let ds = &m.daemon_set["spec"];
    let spec = &ds["template"]["spec"];
    // The selector selects the template.
    let selector = ds["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (k, v) in selector {
        assert_eq!(&ds["template"]["metadata"]["labels"][k], v, "selector {k}");
    }
    let volumes: BTreeSet<&str> = array_of(&spec["volumes"], "volumes")
        .iter()
        .map(|v| str_of(&v["name"], "volume name"))
        .collect();
    let all = array_of(&spec["initContainers"], "initContainers")
        .iter()
        .chain(array_of(&spec["containers"], "containers"));
    for container in all {
        let name = str_of(&container["name"], "name");
        let privileged = container["securityContext"]["privileged"] == true;
        for mount in array_of(&container["volumeMounts"], "volumeMounts") {
            let volume = str_of(&mount["name"], "mount name");
            assert!(
                volumes.contains(volume),
                "{name} mounts unknown volume {volume}"
            );
            // "Bidirectional mount propagation is available only to
            // privileged containers."
            if mount["mountPropagation"] == "Bidirectional" {
                assert!(privileged, "{name}: Bidirectional needs privileged");
            }
        }
    }
    // The install step needs no privilege at all.
    let install = &array_of(&spec["initContainers"], "initContainers")[0]["securityContext"];
    assert!(install["privileged"].is_null() || install["privileged"] == false);
    assert_eq!(install["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(install["allowPrivilegeEscalation"], false);
}
