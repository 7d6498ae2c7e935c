//! The operator's commands over the cluster objects (`podnetctl apply`,
//! `delete` and `get`), talking to the datastore directly as calicoctl does
//! in Calico's etcd mode: no API server runs on our machines, so the
//! checks an API server would make are made here, before anything is
//! written, and the answers are in kubectl's words so that an operator
//! reads them as they would read kubectl's.
//!
//! - `apply`: the operator's files are decoded ([`read_sources`],
//!   [`objects_of`]), every object is checked ([`prepare_apply`]: the API
//!   server's validation and a numeric `resourceVersion`); one refused object
//!   refuses the whole apply and nothing is stored. Then each object is
//!   written in its stored form ([`apply`]): unchanged bytes write nothing,
//!   an object carrying a `resourceVersion` is written only over that
//!   revision (optimistic concurrency, as `kubectl replace`), and a
//!   conflict is refused, never lost.
//! - `delete`: the objects of the files, by key ([`delete`]).
//! - `get`: objects as a table, YAML or JSON ([`get`]); pods joined with
//!   the endpoint records the agents publish (node, IP).
//!
//! Generic over [`ObjectStore`], so that the same code runs over etcd, the
//! nodes-file datastore and, in the unit tests, memory. Output goes to two
//! writers (stdout, stderr) through a [`Console`], which also collects the
//! results for `--json`.

mod apply;
mod format;
mod get;
mod input;
#[cfg(test)]
mod tests;

use std::io::{self, Write};

use serde::Serialize;
use thiserror::Error;

pub use apply::{Prepared, Refused, apply, delete, invalid_message, prepare_apply, report_refused};
pub use get::{GetRequest, OutputFormat, get};
pub use input::{InputError, STDIN_NAME, Source, objects_of, read_sources};

use crate::{
    datastore::objects::{ObjectPath, ObjectStoreError},
    model::cluster::{Kind, ObjectKey},
};

/// Whether every object of a command went as asked (exit 0) or some did
/// not (exit 1; each was reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed,
}

/// What stops a command as a whole (not one object's problem).
#[derive(Debug, Error)]
pub enum CtlError {
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
    #[error("encoding the output: {0}")]
    Encode(String),
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error("{0}")]
    Usage(String),
}

/// One object's result, as `--json` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectResult {
    /// kubectl's `<type>/<name>` (`networkpolicy.networking.k8s.io/deny-all`).
    pub object: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `created`, `configured`, `unchanged`, `deleted`, or what went
    /// wrong: `invalid`, `conflict`, `not-found`, `forbidden`, `error`.
    pub result: &'static str,
    /// The object's revision after a write (its `resourceVersion`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The message printed for a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a command's output goes: lines on stdout and stderr as they
/// happen (an operator sees progress over a slow datastore), or with
/// `json` one JSON document on stdout at the end.
pub struct Console<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    json: bool,
    results: Vec<ObjectResult>,
    failed: bool,
}

impl<'a> Console<'a> {
    pub fn new(out: &'a mut dyn Write, err: &'a mut dyn Write, json: bool) -> Self {
        Self {
            out,
            err,
            json,
            results: Vec::new(),
            failed: false,
        }
    }

    /// Whether output is JSON.
    pub const fn json(&self) -> bool {
        self.json
    }

    /// An object that went as asked: `line` on stdout.
    fn done(&mut self, result: ObjectResult, line: &str) -> Result<(), CtlError> {
        if self.json {
            self.results.push(result);
        } else {
            writeln!(self.out, "{line}")?;
        }
        Ok(())
    }

    /// An object that did not: `message` on stderr; the command fails.
    fn problem(&mut self, mut result: ObjectResult, message: String) -> Result<(), CtlError> {
        self.failed = true;
        if self.json {
            result.error = Some(message);
            self.results.push(result);
        } else {
            writeln!(self.err, "{message}")?;
        }
        Ok(())
    }

    /// A problem that is no object's (a stored value podnet cannot read,
    /// the datastore failing midway): on stderr also with `--json`, whose
    /// stdout stays the results.
    fn error(&mut self, message: &str) -> Result<(), CtlError> {
        self.failed = true;
        writeln!(self.err, "{message}")?;
        Ok(())
    }

    /// A note on stderr that changes nothing (`No resources found`).
    fn note(&mut self, message: &str) -> Result<(), CtlError> {
        writeln!(self.err, "{message}")?;
        Ok(())
    }

    /// Raw text on stdout (tables, YAML, JSON).
    fn print(&mut self, text: &str) -> Result<(), CtlError> {
        self.out.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Ends the command: with `json`, the results; the outcome.
    pub fn finish(self) -> Result<Outcome, CtlError> {
        if self.json && !self.results.is_empty() {
            let text = format::json_text(&self.results)?;
            writeln!(self.out, "{text}")?;
        }
        self.out.flush()?;
        Ok(if self.failed {
            Outcome::Failed
        } else {
            Outcome::Success
        })
    }
}

/// kubectl's name of a kind's type in `apply`'s lines: the lower-case kind,
/// with its API group when it has one (`networkpolicy.networking.k8s.io`).
pub fn type_name(kind: Kind) -> String {
    with_group(&kind.name().to_ascii_lowercase(), kind)
}

/// kubectl's name of a kind's resource in errors: the plural, with its API
/// group (`networkpolicies.networking.k8s.io`).
pub fn resource_name(kind: Kind) -> String {
    with_group(kind.plural(), kind)
}

fn with_group(name: &str, kind: Kind) -> String {
    match kind.api_version().rsplit_once('/') {
        Some((group, _)) => format!("{name}.{group}"),
        None => name.to_owned(),
    }
}

/// Where an object of `key` is stored.
pub fn path_of(key: &ObjectKey) -> Result<ObjectPath, ObjectStoreError> {
    ObjectPath::new(key.kind.plural(), key.namespace.as_deref(), &key.name)
}

/// Whether etcd refused a request for want of permission (a node's
/// credential writing cluster objects). gRPC's PERMISSION_DENIED, which etcd
/// answers with "etcdserver: permission denied".
pub fn is_forbidden(error: &ObjectStoreError) -> bool {
    const PERMISSION_DENIED: i32 = 7;
    matches!(error, ObjectStoreError::Etcd { source, .. }
        if matches!(source.as_ref(), etcd_client::Error::GRpcStatus(status)
            if status.code() as i32 == PERMISSION_DENIED))
}

/// The result record of the object at `key`, before its result is known.
fn result_of(key: &ObjectKey, result: &'static str) -> ObjectResult {
    ObjectResult {
        object: format!("{}/{}", type_name(key.kind), key.name),
        namespace: key.namespace.clone(),
        result,
        revision: None,
        error: None,
    }
}
