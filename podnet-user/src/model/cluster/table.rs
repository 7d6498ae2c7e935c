//! The columns `get` prints for each kind, as kubectl prints them where
//! podnet has the data (no AGE or STATUS: the stored form keeps no
//! server-set fields). The `NAMESPACE` column of `-A` and the node and IP of
//! `get pods -o wide` come from the caller, which knows them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{
    kind::Kind,
    object::ClusterObject,
    types::{EndpointSlice, Service},
};

/// What a value that is not there is shown as.
const NONE: &str = "<none>";
const UNSET: &str = "<unset>";
/// kubectl lists this many endpoint addresses, then says how many more.
const SHOWN_ADDRESSES: usize = 3;

/// The column headers of `kind`.
pub fn columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Namespace | Kind::Pod => &["NAME", "LABELS"],
        Kind::NetworkPolicy => &["NAME", "POD-SELECTOR"],
        Kind::Service => &[
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "SELECTOR",
        ],
        Kind::EndpointSlice => &["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"],
    }
}

impl ClusterObject {
    /// The object's cells under `columns(self.kind())`.
    pub fn row(&self) -> Vec<String> {
        let name = self.name().to_owned();
        match self {
            Self::Namespace(_) | Self::Pod(_) => vec![name, format_labels(self.labels())],
            Self::NetworkPolicy(policy) => {
                let selector = policy
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_selector.clone())
                    .unwrap_or_default();
                vec![name, format_selector(&selector)]
            }
            Self::Service(service) => service_row(name, service),
            Self::EndpointSlice(slice) => endpoint_slice_row(name, slice),
        }
    }
}

/// `a=b,c=d` in key order, `<none>` when empty.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return NONE.to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A selector as kubectl writes it: `app=web,tier in (a,b),!debug`, its
/// requirements in key order; `<none>` when it has none (it selects all).
pub fn format_selector(selector: &LabelSelector) -> String {
    let mut requirements: Vec<(String, String)> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), format!("{k}={v}")))
        .collect();
    for requirement in selector.match_expressions.iter().flatten() {
        let key = &requirement.key;
        let mut values = requirement.values.clone().unwrap_or_default();
        values.sort();
        let values = values.join(",");
        let text = match requirement.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({values})"),
        };
        requirements.push((key.clone(), text));
    }
    if requirements.is_empty() {
        return NONE.to_owned();
    }
    requirements.sort();
    requirements
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(",")
}

fn service_row(name: String, service: &Service) -> Vec<String> {
    let spec = service.spec.clone().unwrap_or_default();
    let service_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
    let cluster_ip = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| NONE.to_owned());
    let external = match service_type.as_str() {
        "ExternalName" => spec.external_name.clone().unwrap_or_default(),
        _ => match spec.external_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.join(","),
            _ if service_type == "LoadBalancer" => "<pending>".to_owned(),
            _ => NONE.to_owned(),
        },
    };
    let ports: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            match p.node_port {
                Some(node_port) if node_port != 0 => format!("{}:{node_port}/{protocol}", p.port),
                _ => format!("{}/{protocol}", p.port),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        NONE.to_owned()
    } else {
        ports.join(",")
    };
    let selector = format_labels(&spec.selector.unwrap_or_default());
    vec![name, service_type, cluster_ip, external, ports, selector]
}

fn endpoint_slice_row(name: String, slice: &EndpointSlice) -> Vec<String> {
    let ports: Vec<String> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            p.port
                .map_or_else(|| UNSET.to_owned(), |port| port.to_string())
        })
        .collect();
    let ports = if ports.is_empty() {
        UNSET.to_owned()
    } else {
        ports.join(",")
    };
    let addresses: Vec<&str> = slice
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.iter().map(String::as_str))
        .collect();
    let shown = addresses
        .iter()
        .take(SHOWN_ADDRESSES)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    let endpoints = match addresses.len() {
        0 => UNSET.to_owned(),
        n if n > SHOWN_ADDRESSES => format!("{shown} + {} more...", n - SHOWN_ADDRESSES),
        _ => shown,
    };
    vec![name, slice.address_type.clone(), ports, endpoints]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::decode;

    fn row(text: &str) -> Vec<String> {
        let object = decode(text).expect("decodes").remove(0);
        let row = object.row();
        assert_eq!(row.len(), columns(object.kind()).len());
        row
    }

    #[test]
    fn rows_of_every_kind() {
        assert_eq!(
            row("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {b: '2', a: '1'}}\n"),
            ["x", "a=1,b=2"]
        );
        assert_eq!(
            row("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"),
            ["p", "<none>"]
        );
        assert_eq!(
            row(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector:\n    matchLabels: {tier: web}\n    matchExpressions:\n    - {key: env, operator: In, values: [prod, dev]}\n    - {key: debug, operator: DoesNotExist}\n    - {key: zone, operator: Exists}\n    - {key: app, operator: NotIn, values: [b]}\n"
            ),
            ["n", "app notin (b),!debug,env in (dev,prod),tier=web,zone"]
        );
        assert_eq!(
            row(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec: {podSelector: {}}\n"
            ),
            ["n", "<none>"]
        );
        assert_eq!(
            row(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.5\n  selector: {app: web}\n  ports:\n  - {name: a, port: 80, nodePort: 30080}\n  - {name: b, port: 53, protocol: UDP}\n"
            ),
            [
                "s",
                "NodePort",
                "10.96.0.5",
                "<none>",
                "80:30080/TCP,53/UDP",
                "app=web"
            ]
        );
        assert_eq!(
            row(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: ExternalName, externalName: db.example.com}\n"
            ),
            [
                "s",
                "ExternalName",
                "<none>",
                "db.example.com",
                "<none>",
                "<none>"
            ]
        );
        assert_eq!(
            row(
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: LoadBalancer, ports: [{port: 443}]}\n"
            )[3],
            "<pending>"
        );
        assert_eq!(
            row(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nports: [{port: 80}, {port: 53}]\nendpoints:\n- addresses: [10.0.0.1]\n- addresses: [10.0.0.2]\n- addresses: [10.0.0.3]\n- addresses: [10.0.0.4]\n- addresses: [10.0.0.5]\n"
            ),
            [
                "e",
                "IPv4",
                "80,53",
                "10.0.0.1,10.0.0.2,10.0.0.3 + 2 more..."
            ]
        );
        assert_eq!(
            row(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv6\n"
            ),
            ["e", "IPv6", "<unset>", "<unset>"]
        );
    }
}
