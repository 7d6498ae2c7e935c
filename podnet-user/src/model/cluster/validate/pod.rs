//! The part of `ValidatePodCreate` (v1) that concerns what podnet reads
//! of a Pod (its containers' names and ports) plus what makes a container
//! at all (a name and an image). The rest of the spec (volumes, security,
//! resources) is kept as given and not checked: podnet runs no containers.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod};

use super::{Errors, PROTOCOLS, Path, rules};

pub(super) fn validate(pod: &Pod, errors: &mut Errors) {
    let path = Path::root("spec");
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if containers.is_empty() {
        errors.required(&path.child("containers"), "");
    }
    // Container names are unique across init and app containers.
    let mut names = BTreeSet::new();
    let init = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    for (i, container) in init.iter().enumerate() {
        validate_container(
            container,
            &path.child("initContainers").index(i),
            &mut names,
            errors,
        );
    }
    for (i, container) in containers.iter().enumerate() {
        validate_container(
            container,
            &path.child("containers").index(i),
            &mut names,
            errors,
        );
    }
}

fn validate_container<'a>(
    container: &'a Container,
    path: &Path,
    names: &mut BTreeSet<&'a str>,
    errors: &mut Errors,
) {
    let name_path = path.child("name");
    if container.name.is_empty() {
        errors.required(&name_path, "");
    } else {
        errors.invalid_each(
            &name_path,
            &container.name,
            rules::dns1123_label(&container.name),
        );
        if !names.insert(&container.name) {
            errors.duplicate(&name_path, super::quoted(&container.name));
        }
    }
    if container.image.as_deref().unwrap_or_default().is_empty() {
        errors.required(&path.child("image"), "");
    }
    validate_ports(
        container.ports.as_deref().unwrap_or_default(),
        &path.child("ports"),
        errors,
    );
}

/// `validateContainerPorts`: names are IANA service names, unique within
/// the container (the API server allows the same name in two containers);
/// numbers in range; protocols known.
fn validate_ports(ports: &[ContainerPort], path: &Path, errors: &mut Errors) {
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let port_path = path.index(i);
        if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            let problems = rules::port_name_problems(name);
            for problem in &problems {
                errors.invalid_str(&port_path.child("name"), name, problem);
            }
            if problems.is_empty() && !names.insert(name) {
                errors.duplicate(&port_path.child("name"), super::quoted(name));
            }
        }
        if port.container_port == 0 {
            errors.required(&port_path.child("containerPort"), "");
        } else if let Some(problem) = rules::port_number(port.container_port) {
            errors.invalid(
                &port_path.child("containerPort"),
                port.container_port,
                problem,
            );
        }
        if let Some(host_port) = port.host_port.filter(|p| *p != 0)
            && let Some(problem) = rules::port_number(host_port)
        {
            errors.invalid(&port_path.child("hostPort"), host_port, problem);
        }
        if let Some(protocol) = &port.protocol
            && !PROTOCOLS.contains(&protocol.as_str())
        {
            errors.unsupported(&port_path.child("protocol"), protocol, PROTOCOLS);
        }
    }
}
