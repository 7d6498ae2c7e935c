//! `ValidateNetworkPolicy` (networking.k8s.io/v1).

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Errors, PROTOCOLS, Path, meta::validate_selector, rules};

const POLICY_TYPES: &[&str] = &["Egress", "Ingress"];

pub(super) fn validate(policy: &NetworkPolicy, errors: &mut Errors) {
    let path = Path::root("spec");
    let Some(spec) = &policy.spec else {
        return;
    };
    if let Some(selector) = &spec.pod_selector {
        validate_selector(selector, &path.child("podSelector"), errors);
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let rule_path = path.child("ingress").index(i);
        validate_ports(rule.ports.as_deref(), &rule_path, errors);
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            validate_peer(peer, &rule_path.child("from").index(j), errors);
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let rule_path = path.child("egress").index(i);
        validate_ports(rule.ports.as_deref(), &rule_path, errors);
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            validate_peer(peer, &rule_path.child("to").index(j), errors);
        }
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    for (i, policy_type) in types.iter().enumerate() {
        if !POLICY_TYPES.contains(&policy_type.as_str()) {
            errors.unsupported(
                &path.child("policyTypes").index(i),
                policy_type,
                POLICY_TYPES,
            );
        }
    }
    if types.len() > POLICY_TYPES.len() {
        errors.invalid(
            &path.child("policyTypes"),
            format!("{types:?}"),
            "may not specify more than two policyTypes",
        );
    }
}

fn validate_ports(ports: Option<&[NetworkPolicyPort]>, rule_path: &Path, errors: &mut Errors) {
    for (i, port) in ports.unwrap_or_default().iter().enumerate() {
        validate_port(port, &rule_path.child("ports").index(i), errors);
    }
}

/// `ValidateNetworkPolicyPort`: a protocol podnet and the API know, a port
/// number or name, and a range end only after a numeric port.
fn validate_port(port: &NetworkPolicyPort, path: &Path, errors: &mut Errors) {
    if let Some(protocol) = &port.protocol
        && !PROTOCOLS.contains(&protocol.as_str())
    {
        errors.unsupported(&path.child("protocol"), protocol, PROTOCOLS);
    }
    let end_path = path.child("endPort");
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(number)), end) => {
            if let Some(problem) = rules::port_number(*number) {
                errors.invalid(&path.child("port"), number, problem);
            }
            if let Some(end) = end {
                if end < *number {
                    errors.invalid(&end_path, end, "must be greater than or equal to `port`");
                }
                if let Some(problem) = rules::port_number(end) {
                    errors.invalid(&end_path, end, problem);
                }
            }
        }
        (Some(IntOrString::String(_)), Some(end)) => {
            errors.invalid(
                &end_path,
                end,
                "may not be specified when `port` is non-numeric",
            );
        }
        (Some(IntOrString::String(name)), None) => {
            for problem in rules::port_name_problems(name) {
                errors.invalid_str(&path.child("port"), name, problem);
            }
        }
        (None, Some(end)) => {
            errors.invalid(
                &end_path,
                end,
                "may not be specified when `port` is not specified",
            );
        }
        (None, None) => {}
    }
}

/// `ValidateNetworkPolicyPeer`: selectors, or an ipBlock alone.
fn validate_peer(peer: &NetworkPolicyPeer, path: &Path, errors: &mut Errors) {
    let mut peers = 0;
    if let Some(selector) = &peer.pod_selector {
        peers += 1;
        validate_selector(selector, &path.child("podSelector"), errors);
    }
    if let Some(selector) = &peer.namespace_selector {
        peers += 1;
        validate_selector(selector, &path.child("namespaceSelector"), errors);
    }
    if let Some(block) = &peer.ip_block {
        peers += 1;
        validate_ip_block(block, &path.child("ipBlock"), errors);
    }
    if peers == 0 {
        errors.required(path, "must specify a peer");
    } else if peer.ip_block.is_some() && peers > 1 {
        errors.forbidden(path, "may not specify both ipBlock and another peer");
    }
}

/// `ValidateIPBlock`: a CIDR, and every exception strictly inside it (same
/// family, longer prefix).
fn validate_ip_block(block: &IPBlock, path: &Path, errors: &mut Errors) {
    let cidr_path = path.child("cidr");
    if block.cidr.is_empty() {
        errors.required(&cidr_path, "");
        return;
    }
    let Some(cidr) = rules::cidr(&block.cidr) else {
        errors.invalid_str(&cidr_path, &block.cidr, rules::CIDR_MESSAGE);
        return;
    };
    for (i, except) in block.except.iter().flatten().enumerate() {
        let except_path = path.child("except").index(i);
        let Some(inner) = rules::cidr(except) else {
            errors.invalid_str(&except_path, except, rules::CIDR_MESSAGE);
            continue;
        };
        if !cidr.contains(&inner.addr()) || cidr.prefix_len() >= inner.prefix_len() {
            errors.invalid_str(&except_path, except, "must be a strict subset of `cidr`");
        }
    }
}
