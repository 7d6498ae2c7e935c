//! `get`: objects of one kind, as a table, YAML or JSON. Pods are joined
//! with the endpoint records the agents publish: a pod is running
//! somewhere (a record: node, IP) and may have a Pod object (labels); a
//! table lists both kinds of pods, so that `get pods` and `get pods -o wide`
//! show the same pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::Serialize;

use super::{Console, CtlError, format, path_of, resource_name};
use crate::{
    datastore::objects::ObjectStore,
    model::cluster::{
        ClusterObject, DEFAULT_NAMESPACE, Kind, ObjectKey, PodEndpointRecord, columns,
        format_labels,
    },
};

/// What a missing value is shown as.
const NONE: &str = "<none>";

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// The kind's columns (`--json`: as `Json`).
    Table,
    /// The columns with more (a pod's node and IP); `--json`: a pod's
    /// row as a JSON object (the node and IP are in no object).
    Wide,
    Yaml,
    Json,
}

/// `get KIND [NAME...] [-n NS | -A] [-o ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    pub kind: Kind,
    /// None: every object (of the namespace).
    pub names: Vec<String>,
    /// `-n`; `None`: `default` (namespaced kinds).
    pub namespace: Option<String>,
    /// `-A`: every namespace.
    pub all_namespaces: bool,
    pub output: OutputFormat,
}

/// A pod's Pod object labels (`None`: no object) and its records (node,
/// IP).
type PodEntry = (
    Option<BTreeMap<String, String>>,
    Vec<(String, Option<Ipv4Addr>)>,
);

/// A pod as `get pods` lists it: its Pod object's labels (`None`: no
/// object) and where it runs (`None`: no record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct PodRow {
    namespace: String,
    name: String,
    node: Option<String>,
    ip: Option<Ipv4Addr>,
    labels: Option<BTreeMap<String, String>>,
}

/// `get`: prints what `request` asks for; a name that is not there is
/// kubectl's NotFound error (the others are still shown).
pub async fn get<S: ObjectStore>(
    store: &mut S,
    request: &GetRequest,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    if request.all_namespaces && !request.names.is_empty() {
        return Err(CtlError::Usage(
            "a resource cannot be retrieved by name across all namespaces".into(),
        ));
    }
    let kind = request.kind;
    let scope = if !kind.namespaced() || request.all_namespaces {
        None
    } else {
        Some(
            request
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        )
    };
    let objects = read_objects(store, request, scope.as_deref(), console).await?;
    let output = match (request.output, console.json()) {
        (OutputFormat::Table, true) => OutputFormat::Json,
        (output, _) => output,
    };
    match output {
        OutputFormat::Yaml | OutputFormat::Json => {
            let present: BTreeSet<&str> = objects.iter().map(ClusterObject::name).collect();
            not_found(request, &present, console)?;
            print_objects(&objects, request, output, console)
        }
        OutputFormat::Table | OutputFormat::Wide if kind == Kind::Pod => {
            let rows = pod_rows(store, objects, request, scope.as_deref(), console).await?;
            let present: BTreeSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
            not_found(request, &present, console)?;
            if rows.is_empty() {
                return nothing_found(request, scope.as_deref(), console);
            }
            if output == OutputFormat::Wide && console.json() {
                return console.print(&format!("{}\n", format::json_text(&rows)?));
            }
            print_pods(&rows, request, output == OutputFormat::Wide, console)
        }
        OutputFormat::Table | OutputFormat::Wide => {
            let present: BTreeSet<&str> = objects.iter().map(ClusterObject::name).collect();
            not_found(request, &present, console)?;
            if objects.is_empty() {
                return nothing_found(request, scope.as_deref(), console);
            }
            let show_namespace = request.all_namespaces && kind.namespaced();
            let mut headers: Vec<&str> = columns(kind).to_vec();
            if show_namespace {
                headers.insert(0, "NAMESPACE");
            }
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    let mut row = o.row();
                    if show_namespace {
                        row.insert(0, o.namespace().unwrap_or_default().to_owned());
                    }
                    row
                })
                .collect();
            console.print(&format::table(&headers, &rows))
        }
    }
}

/// The objects asked for, with their revision as `resourceVersion`. A
/// stored value podnet cannot read is reported and left out.
async fn read_objects<S: ObjectStore>(
    store: &mut S,
    request: &GetRequest,
    scope: Option<&str>,
    console: &mut Console<'_>,
) -> Result<Vec<ClusterObject>, CtlError> {
    let kind = request.kind;
    let stored = if request.names.is_empty() {
        store.list(Some(kind.plural()), scope).await?.objects
    } else {
        let mut found = Vec::new();
        for name in &request.names {
            let key = ObjectKey {
                kind,
                namespace: scope.map(str::to_owned),
                name: name.clone(),
            };
            // A name no object can have is not found, like any other.
            if let Ok(path) = path_of(&key)
                && let Some(object) = store.get(&path).await?
            {
                found.push(object);
            }
        }
        found
    };
    let mut objects = Vec::new();
    for object in stored {
        match ClusterObject::from_stored_json(&object.value, object.revision) {
            Ok(o) => objects.push(o),
            Err(e) => console.error(&format!("error: stored object {}: {e}", object.path))?,
        }
    }
    Ok(objects)
}

/// kubectl's NotFound for each name asked for and not `present`.
fn not_found(
    request: &GetRequest,
    present: &BTreeSet<&str>,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    for name in &request.names {
        if !present.contains(name.as_str()) {
            console.error(&format!(
                "Error from server (NotFound): {} {name:?} not found",
                resource_name(request.kind)
            ))?;
        }
    }
    Ok(())
}

/// kubectl's note for an empty listing (on stderr; not an error).
fn nothing_found(
    request: &GetRequest,
    scope: Option<&str>,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    if !request.names.is_empty() {
        return Ok(());
    }
    match scope {
        Some(ns) => console.note(&format!("No resources found in {ns} namespace.")),
        None => console.note("No resources found"),
    }
}

/// `-o yaml|json`: one object asked for by name as itself, anything else
/// as a List.
fn print_objects(
    objects: &[ClusterObject],
    request: &GetRequest,
    output: OutputFormat,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let value = match objects {
        [one] if request.names.len() == 1 => {
            serde_json::to_value(one).map_err(|e| CtlError::Encode(e.to_string()))?
        }
        [] if !request.names.is_empty() => return Ok(()),
        _ => format::list_value(objects)?,
    };
    let text = if output == OutputFormat::Yaml {
        format::yaml_text(&value)?
    } else {
        format!("{}\n", format::json_text(&value)?)
    };
    console.print(&text)
}

/// The pods of `objects` and of the endpoint records in scope, one row per
/// record (a pod recorded by two nodes, one of them stale, shows twice:
/// both are facts an operator must see) or one without a node.
async fn pod_rows<S: ObjectStore>(
    store: &mut S,
    objects: Vec<ClusterObject>,
    request: &GetRequest,
    scope: Option<&str>,
    console: &mut Console<'_>,
) -> Result<Vec<PodRow>, CtlError> {
    let wanted = |namespace: &str, name: &str| {
        scope.is_none_or(|ns| ns == namespace)
            && (request.names.is_empty() || request.names.iter().any(|n| n == name))
    };
    let mut pods: BTreeMap<(String, String), PodEntry> = BTreeMap::new();
    for object in objects {
        let key = (
            object.namespace().unwrap_or_default().to_owned(),
            object.name().to_owned(),
        );
        pods.entry(key).or_default().0 = Some(object.labels().clone());
    }
    let (records, _) = store.list_endpoints(None).await?;
    for record in records {
        let key = &record.key;
        if !wanted(key.namespace(), key.name()) {
            continue;
        }
        // The key says whose record it is (a node's credential writes
        // only under its own node's prefix); the value adds the IP.
        let ip = match serde_json::from_slice::<PodEndpointRecord>(&record.value) {
            Ok(value) => Some(value.ip),
            Err(e) => {
                console.error(&format!("error: endpoint record {key}: {e}"))?;
                None
            }
        };
        pods.entry((key.namespace().to_owned(), key.name().to_owned()))
            .or_default()
            .1
            .push((key.node().to_owned(), ip));
    }
    let mut rows = Vec::new();
    for ((namespace, name), (labels, records)) in pods {
        if records.is_empty() {
            rows.push(PodRow {
                namespace,
                name,
                node: None,
                ip: None,
                labels,
            });
            continue;
        }
        for (node, ip) in records {
            rows.push(PodRow {
                namespace: namespace.clone(),
                name: name.clone(),
                node: Some(node),
                ip,
                labels: labels.clone(),
            });
        }
    }
    Ok(rows)
}

fn print_pods(
    rows: &[PodRow],
    request: &GetRequest,
    wide: bool,
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    let mut headers = Vec::new();
    if request.all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    if wide {
        headers.extend(["NODE", "IP"]);
    }
    headers.push("LABELS");
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = Vec::new();
            if request.all_namespaces {
                row.push(r.namespace.clone());
            }
            row.push(r.name.clone());
            if wide {
                row.push(r.node.clone().unwrap_or_else(|| NONE.to_owned()));
                row.push(r.ip.map_or_else(|| NONE.to_owned(), |ip| ip.to_string()));
            }
            row.push(
                r.labels
                    .as_ref()
                    .map_or_else(|| NONE.to_owned(), format_labels),
            );
            row
        })
        .collect();
    console.print(&format::table(&headers, &cells))
}
