//! Output as kubectl writes it: tables with columns three spaces apart,
//! JSON indented by four spaces, YAML, and several objects as a `v1 List`.

use serde::Serialize;
use serde_json::{Value, json};

use super::CtlError;
use crate::model::cluster::ClusterObject;

/// Space between two columns (kubectl's tabwriter padding).
const GAP: usize = 3;

/// `rows` under `headers`, each column as wide as its widest cell, the last
/// one not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + GAP;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push('\n');
    }
    text
}

/// JSON as kubectl prints it (four spaces).
pub fn json_text<T: Serialize>(value: &T) -> Result<String, CtlError> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut serializer)
        .map_err(|e| CtlError::Encode(e.to_string()))?;
    String::from_utf8(out).map_err(|e| CtlError::Encode(e.to_string()))
}

pub fn yaml_text<T: Serialize>(value: &T) -> Result<String, CtlError> {
    serde_norway::to_string(value).map_err(|e| CtlError::Encode(e.to_string()))
}

/// Objects as kubectl shows a listing: a `v1 List` (whose own
/// resourceVersion kubectl leaves empty).
pub fn list_value(objects: &[ClusterObject]) -> Result<Value, CtlError> {
    let items = objects
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<Value>, _>>()
        .map_err(|e| CtlError::Encode(e.to_string()))?;
    Ok(json!({
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }))
}
