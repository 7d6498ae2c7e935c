//! `ValidateService` (v1), for a create after the API server's defaulting.
//!
//! All four types are stored and checked as the API server checks them;
//! podnet's Service translation serves `ClusterIP` Services (and NodePort's
//! cluster IP part); headless Services need none, and ExternalName and
//! LoadBalancer's external side are for DNS and cloud controllers, which
//! podnet is not.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Errors, PROTOCOLS, Path, meta::validate_labels, rules};

const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const AFFINITIES: &[&str] = &["ClientIP", "None"];
const TRAFFIC_POLICIES: &[&str] = &["Cluster", "Local"];
const FAMILY_POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
const FAMILIES: &[&str] = &["IPv4", "IPv6"];
/// The API server's default `--service-node-port-range`.
const NODE_PORTS: std::ops::RangeInclusive<i32> = 30000..=32767;
/// `ClientIP` affinity's timeout, at most a day.
const MAX_AFFINITY_SECONDS: i32 = 86400;

pub(super) fn validate(service: &Service, errors: &mut Errors) {
    let default = ServiceSpec::default();
    let spec = service.spec.as_ref().unwrap_or(&default);
    let path = Path::root("spec");
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !TYPES.contains(&service_type) {
        errors.unsupported(&path.child("type"), service_type, TYPES);
    }
    let cluster_ips = cluster_ips(spec);
    let headless = cluster_ips.first().is_some_and(|ip| ip == "None");
    validate_type_rules(
        spec,
        service_type,
        headless,
        !cluster_ips.is_empty(),
        errors,
    );
    validate_cluster_ips(spec, &cluster_ips, errors);
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless && service_type != "ExternalName" {
        errors.required(&path.child("ports"), "");
    }
    validate_ports(ports, service_type, errors);
    if let Some(selector) = &spec.selector {
        validate_labels(selector, &path.child("selector"), errors);
    }
    validate_affinity(spec, errors);
    validate_traffic_policies(spec, service_type, errors);
    validate_ip_families(spec, errors);
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if rules::ip(ip).is_none() {
            errors.invalid_str(&path.child("externalIPs").index(i), ip, rules::IP_MESSAGE);
        }
    }
}

/// `clusterIPs` as the API server sees it after defaulting: the list, or
/// `clusterIP` alone when the list is absent.
fn cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

fn validate_cluster_ips(spec: &ServiceSpec, ips: &[String], errors: &mut Errors) {
    let path = Path::root("spec").child("clusterIPs");
    if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty())
        && ips.first().is_some_and(|first| first != ip)
    {
        errors.invalid(
            &path,
            format!("{ips:?}"),
            "element [0] must match clusterIP",
        );
    }
    if ips.len() > 1 && ips.iter().any(|ip| ip == "None") {
        errors.invalid(
            &path,
            format!("{ips:?}"),
            "'None' must be the first and only value",
        );
    }
    for (i, ip) in ips.iter().enumerate() {
        if ip != "None" && rules::ip(ip).is_none() {
            errors.invalid_str(&path.index(i), ip, rules::IP_MESSAGE);
        }
    }
    let families: Vec<bool> = ips
        .iter()
        .filter_map(|ip| rules::ip(ip))
        .map(|ip| ip.is_ipv4())
        .collect();
    if ips.len() > 2 {
        errors.invalid(&path, format!("{ips:?}"), "may only hold up to 2 values");
    } else if families.len() == 2 && families[0] == families[1] {
        errors.invalid(
            &path,
            format!("{ips:?}"),
            "may specify no more than one IP for each IP family",
        );
    }
}

/// What each type allows of the cluster IP and external name.
fn validate_type_rules(
    spec: &ServiceSpec,
    service_type: &str,
    headless: bool,
    has_cluster_ip: bool,
    errors: &mut Errors,
) {
    let path = Path::root("spec");
    match service_type {
        "LoadBalancer" | "NodePort" if headless => errors.invalid_str(
            &path.child("clusterIPs").index(0),
            "None",
            &format!("may not be set to 'None' for {service_type} services"),
        ),
        "ExternalName" => {
            if has_cluster_ip {
                errors.forbidden(
                    &path.child("clusterIPs"),
                    "may not be set for ExternalName services",
                );
            }
            let name = spec.external_name.as_deref().unwrap_or_default();
            let clean = name.strip_suffix('.').unwrap_or(name);
            if clean.is_empty() {
                errors.required(&path.child("externalName"), "");
            } else {
                errors.invalid_each(
                    &path.child("externalName"),
                    name,
                    rules::dns1123_subdomain(clean),
                );
            }
        }
        _ => {}
    }
}

/// `ValidateServicePort` for each port, then the pairs that must be unique.
fn validate_ports(ports: &[ServicePort], service_type: &str, errors: &mut Errors) {
    let path = Path::root("spec").child("ports");
    let require_names = ports.len() > 1;
    let mut names = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    let mut node_ports = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let port_path = path.index(i);
        let name = port.name.as_deref().unwrap_or_default();
        if name.is_empty() {
            if require_names {
                errors.required(&port_path.child("name"), "");
            }
        } else {
            errors.invalid_each(&port_path.child("name"), name, rules::dns1123_label(name));
            if !names.insert(name) {
                errors.duplicate(&port_path.child("name"), super::quoted(name));
            }
        }
        if let Some(problem) = rules::port_number(port.port) {
            errors.invalid(&port_path.child("port"), port.port, problem);
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&protocol) {
            errors.unsupported(&port_path.child("protocol"), protocol, PROTOCOLS);
        }
        validate_target_port(
            port.target_port.as_ref(),
            &port_path.child("targetPort"),
            errors,
        );
        if let Some(app_protocol) = &port.app_protocol {
            errors.invalid_each(
                &port_path.child("appProtocol"),
                app_protocol,
                rules::qualified_name(app_protocol),
            );
        }
        if !pairs.insert((port.port, protocol)) {
            errors.duplicate(&port_path, format!("{}/{protocol}", port.port));
        }
        validate_node_port(
            port,
            protocol,
            service_type,
            &port_path,
            &mut node_ports,
            errors,
        );
    }
}

/// A number or an IANA port name; absent, zero or empty is defaulted to
/// the port.
fn validate_target_port(target: Option<&IntOrString>, path: &Path, errors: &mut Errors) {
    match target {
        None | Some(IntOrString::Int(0)) => {}
        Some(IntOrString::Int(number)) => {
            if let Some(problem) = rules::port_number(*number) {
                errors.invalid(path, number, problem);
            }
        }
        Some(IntOrString::String(name)) if name.is_empty() => {}
        Some(IntOrString::String(name)) => {
            for problem in rules::port_name_problems(name) {
                errors.invalid_str(path, name, problem);
            }
        }
    }
}

fn validate_node_port<'a>(
    port: &ServicePort,
    protocol: &'a str,
    service_type: &str,
    port_path: &Path,
    seen: &mut BTreeSet<(i32, &'a str)>,
    errors: &mut Errors,
) {
    let Some(node_port) = port.node_port.filter(|p| *p != 0) else {
        return;
    };
    let path = port_path.child("nodePort");
    if !matches!(service_type, "NodePort" | "LoadBalancer") {
        errors.forbidden(
            &path,
            &format!("may not be used when `type` is '{service_type}'"),
        );
        return;
    }
    if let Some(problem) = rules::port_number(node_port) {
        errors.invalid(&path, node_port, problem);
    } else if !NODE_PORTS.contains(&node_port) {
        errors.invalid(
            &path,
            node_port,
            &format!(
                "provided port is not in the valid range. The range of valid ports is {}-{}",
                NODE_PORTS.start(),
                NODE_PORTS.end()
            ),
        );
    }
    if !seen.insert((node_port, protocol)) {
        errors.duplicate(&path, node_port);
    }
}

fn validate_affinity(spec: &ServiceSpec, errors: &mut Errors) {
    let path = Path::root("spec");
    let affinity = spec.session_affinity.as_deref().unwrap_or("None");
    if !AFFINITIES.contains(&affinity) {
        errors.unsupported(&path.child("sessionAffinity"), affinity, AFFINITIES);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match affinity {
        "ClientIP" => {
            if let Some(timeout) = timeout.filter(|t| !(1..=MAX_AFFINITY_SECONDS).contains(t)) {
                errors.invalid(
                    &path
                        .child("sessionAffinityConfig")
                        .child("clientIP")
                        .child("timeoutSeconds"),
                    timeout,
                    "must be greater than 0 and less than 86400",
                );
            }
        }
        "None" if spec.session_affinity_config.is_some() => {
            errors.forbidden(
                &path.child("sessionAffinityConfig"),
                "must not be set when session affinity is None",
            );
        }
        _ => {}
    }
}

/// Both traffic policies take Cluster or Local; the external one only on
/// Services reachable from outside (NodePort, LoadBalancer, or with
/// externalIPs).
fn validate_traffic_policies(spec: &ServiceSpec, service_type: &str, errors: &mut Errors) {
    let path = Path::root("spec");
    if let Some(policy) = &spec.external_traffic_policy {
        let external = matches!(service_type, "NodePort" | "LoadBalancer")
            || (service_type == "ClusterIP"
                && spec
                    .external_ips
                    .as_ref()
                    .is_some_and(|ips| !ips.is_empty()));
        if !external {
            errors.invalid_str(
                &path.child("externalTrafficPolicy"),
                policy,
                "may only be set for externally-accessible services",
            );
        } else if !TRAFFIC_POLICIES.contains(&policy.as_str()) {
            errors.unsupported(
                &path.child("externalTrafficPolicy"),
                policy,
                TRAFFIC_POLICIES,
            );
        }
    }
    if let Some(policy) = &spec.internal_traffic_policy
        && !TRAFFIC_POLICIES.contains(&policy.as_str())
    {
        errors.unsupported(
            &path.child("internalTrafficPolicy"),
            policy,
            TRAFFIC_POLICIES,
        );
    }
}

/// `ipFamilyPolicy` and `ipFamilies`: known values, each family once, at
/// most two.
fn validate_ip_families(spec: &ServiceSpec, errors: &mut Errors) {
    let path = Path::root("spec");
    if let Some(policy) = &spec.ip_family_policy
        && !FAMILY_POLICIES.contains(&policy.as_str())
    {
        errors.unsupported(&path.child("ipFamilyPolicy"), policy, FAMILY_POLICIES);
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (i, family) in families.iter().enumerate() {
        let family_path = path.child("ipFamilies").index(i);
        if !FAMILIES.contains(&family.as_str()) {
            errors.unsupported(&family_path, family, FAMILIES);
        } else if !seen.insert(family) {
            errors.duplicate(&family_path, super::quoted(family));
        }
    }
    if families.len() > 2 {
        errors.invalid(
            &path.child("ipFamilies"),
            format!("{families:?}"),
            "may only hold up to 2 values",
        );
    }
}
