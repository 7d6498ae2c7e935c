//! `ValidateEndpointSlice` (discovery.k8s.io/v1), for a create. Its fields
//! are at the top level (no `spec`), and so are its paths.

use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use super::{Errors, PROTOCOLS, Path, rules};

/// `IP` is only kept on old slices (updates), not taken on a create.
const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
const MAX_ADDRESSES: usize = 100;
const MAX_ENDPOINTS: usize = 1000;
const MAX_PORTS: usize = 20000;

pub(super) fn validate(slice: &EndpointSlice, errors: &mut Errors) {
    let address_type = slice.address_type.as_str();
    let type_path = Path::root("addressType");
    if address_type.is_empty() {
        errors.required(&type_path, "");
    } else if !ADDRESS_TYPES.contains(&address_type) {
        errors.unsupported(&type_path, address_type, ADDRESS_TYPES);
    }
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    let path = Path::root("endpoints");
    if endpoints.len() > MAX_ENDPOINTS {
        errors.too_many(&path, endpoints.len(), MAX_ENDPOINTS);
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        validate_endpoint(endpoint, address_type, &path.index(i), errors);
    }
    validate_ports(slice.ports.as_deref().unwrap_or_default(), errors);
}

fn validate_endpoint(endpoint: &Endpoint, address_type: &str, path: &Path, errors: &mut Errors) {
    let addresses_path = path.child("addresses");
    let addresses = &endpoint.addresses;
    if addresses.is_empty() {
        errors.required(&addresses_path, "must contain at least 1 address");
    } else if addresses.len() > MAX_ADDRESSES {
        errors.too_many(&addresses_path, addresses.len(), MAX_ADDRESSES);
    }
    for (i, address) in addresses.iter().enumerate() {
        let address_path = addresses_path.index(i);
        match address_type {
            "IPv4" if !rules::ip(address).is_some_and(|ip| ip.is_ipv4()) => {
                errors.invalid_str(&address_path, address, "must be a valid IPv4 address");
            }
            "IPv6" if !rules::ip(address).is_some_and(|ip| ip.is_ipv6()) => {
                errors.invalid_str(&address_path, address, "must be a valid IPv6 address");
            }
            "FQDN" => errors.invalid_each(&address_path, address, rules::fqdn(address)),
            _ => {}
        }
    }
    if let Some(hostname) = &endpoint.hostname {
        errors.invalid_each(
            &path.child("hostname"),
            hostname,
            rules::dns1123_label(hostname),
        );
    }
    if let Some(node) = &endpoint.node_name {
        errors.invalid_each(
            &path.child("nodeName"),
            node,
            rules::dns1123_subdomain(node),
        );
    }
}

fn validate_ports(ports: &[EndpointPort], errors: &mut Errors) {
    let path = Path::root("ports");
    if ports.len() > MAX_PORTS {
        errors.too_many(&path, ports.len(), MAX_PORTS);
    }
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let port_path = path.index(i);
        let name = port.name.as_deref().unwrap_or_default();
        if !name.is_empty() {
            errors.invalid_each(&port_path.child("name"), name, rules::dns1123_label(name));
        }
        // The empty name counts too: one unnamed port per slice.
        if !names.insert(name) {
            errors.duplicate(&port_path.child("name"), super::quoted(name));
        }
        if let Some(number) = port.port
            && let Some(problem) = rules::port_number(number)
        {
            errors.invalid(&port_path.child("port"), number, problem);
        }
        if let Some(protocol) = &port.protocol
            && !PROTOCOLS.contains(&protocol.as_str())
        {
            errors.unsupported(&port_path.child("protocol"), protocol, PROTOCOLS);
        }
        if let Some(app_protocol) = &port.app_protocol {
            errors.invalid_each(
                &port_path.child("appProtocol"),
                app_protocol,
                rules::qualified_name(app_protocol),
            );
        }
    }
}
