//! `apply` and `delete`: every object checked first, then each written,
//! with kubectl's lines for what happened.

use super::{Console, CtlError, path_of, resource_name, result_of, type_name};
use crate::{
    datastore::{
        etcd::OPERATOR_USER,
        objects::{ApplyOutcome, Expect, ObjectPath, ObjectStore, ObjectStoreError},
    },
    model::cluster::{ClusterObject, FieldError, FieldErrorType, ObjectKey, ValidationError},
};

/// An object checked and ready to write.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub key: ObjectKey,
    path: ObjectPath,
    /// The stored form: the same object always gives the same bytes, which
    /// is what makes an unchanged apply write nothing.
    bytes: Vec<u8>,
    expect: Expect,
}

/// An object refused before anything was written, with kubectl's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: ObjectKey,
    pub message: String,
}

/// kubectl's message for an object the API server refused: one problem on
/// the line, several as a list below it.
pub fn invalid_message(error: &ValidationError) -> String {
    let head = format!("The {} {:?} is invalid: ", error.kind, error.name);
    match error.errors.as_slice() {
        [one] => format!("{head}{one}"),
        many => many.iter().fold(head, |mut text, e| {
            text.push_str("\n* ");
            text.push_str(&e.to_string());
            text
        }),
    }
}

/// A problem of `object` at `field`, refused as the API server would.
fn invalid_field(object: &ClusterObject, field: &str, value: &str, detail: String) -> String {
    invalid_message(&ValidationError {
        kind: object.kind(),
        name: object.name().to_owned(),
        errors: vec![FieldError {
            field: field.to_owned(),
            error_type: FieldErrorType::Invalid,
            value: Some(format!("{value:?}")),
            detail,
        }],
    })
}

/// Checks every object (the API server's validation, a `resourceVersion`
/// that is a revision, a key the datastore can hold) and encodes it; all
/// of them or the refused ones, so that nothing is written when one is bad.
pub fn prepare_apply(objects: &[ClusterObject]) -> Result<Vec<Prepared>, Vec<Refused>> {
    let mut prepared = Vec::new();
    let mut refused = Vec::new();
    for object in objects {
        let key = object.key();
        match prepare_one(object) {
            Ok(p) => prepared.push(p),
            Err(message) => refused.push(Refused { key, message }),
        }
    }
    if refused.is_empty() {
        Ok(prepared)
    } else {
        Err(refused)
    }
}

fn prepare_one(object: &ClusterObject) -> Result<Prepared, String> {
    object.validate().map_err(|e| invalid_message(&e))?;
    // A resourceVersion is the revision the object was read at (`get -o
    // yaml`, edit, apply): written only over that revision, so that a
    // change made meanwhile is refused instead of overwritten.
    let expect = match object.resource_version() {
        None | Some("") => Expect::Any,
        Some(text) => match text.parse::<i64>() {
            Ok(revision) if revision >= 0 => Expect::Revision(revision),
            _ => {
                return Err(invalid_field(
                    object,
                    "metadata.resourceVersion",
                    text,
                    "must be a revision of this datastore, as `get` shows it (or left out)".into(),
                ));
            }
        },
    };
    let key = object.key();
    let path = path_of(&key).map_err(|e| {
        invalid_field(
            object,
            "metadata.name",
            object.name(),
            format!("cannot be stored: {e}"),
        )
    })?;
    let bytes = object
        .to_stored_json()
        .map_err(|e| format!("error: {}", chain(&e)))?;
    Ok(Prepared {
        key,
        path,
        bytes,
        expect,
    })
}

/// Reports the objects [`prepare_apply`] refused.
pub fn report_refused(refused: &[Refused], console: &mut Console<'_>) -> Result<(), CtlError> {
    for r in refused {
        console.problem(result_of(&r.key, "invalid"), r.message.clone())?;
    }
    Ok(())
}

/// An error with its causes, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn forbidden_message(key: &ObjectKey, verb: &str) -> String {
    format!(
        "Error from server (Forbidden): {} {:?} is forbidden: this credential may not {verb} \
         cluster objects (etcd: permission denied); use the operator's ({OPERATOR_USER})",
        resource_name(key.kind),
        key.name
    )
}

fn not_found_message(key: &ObjectKey) -> String {
    format!(
        "Error from server (NotFound): {} {:?} not found",
        resource_name(key.kind),
        key.name
    )
}

/// A failure that is the datastore's, not the object's: the objects after
/// it are not tried (each would wait for the same unreachable store).
fn abandon(
    console: &mut Console<'_>,
    verb: &str,
    key: &ObjectKey,
    error: &ObjectStoreError,
    left: usize,
) -> Result<(), CtlError> {
    console.problem(
        result_of(key, "error"),
        format!(
            "error: {verb} {}/{}: {}",
            type_name(key.kind),
            key.name,
            chain(error)
        ),
    )?;
    if left > 0 {
        console.error(&format!(
            "error: {left} more object(s) not tried: the datastore failed"
        ))?;
    }
    Ok(())
}

/// Writes each prepared object; kubectl's line for each
/// (`<type>/<name> created|configured|unchanged`), a conflict or a refusal
/// for those that were not written.
pub async fn apply<S: ObjectStore>(
    store: &mut S,
    objects: &[Prepared],
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    for (index, object) in objects.iter().enumerate() {
        let key = &object.key;
        let name = format!("{}/{}", type_name(key.kind), key.name);
        match store
            .apply(&object.path, &object.bytes, object.expect)
            .await
        {
            Ok(outcome) => {
                let word = match outcome {
                    ApplyOutcome::Created(_) => "created",
                    ApplyOutcome::Updated(_) => "configured",
                    ApplyOutcome::Unchanged(_) => "unchanged",
                };
                let mut result = result_of(key, word);
                result.revision = Some(outcome.revision());
                console.done(result, &format!("{name} {word}"))?;
            }
            Err(ObjectStoreError::Conflict {
                expected, found: 0, ..
            }) => {
                let message = format!(
                    "{} (it carries resourceVersion {expected}: deleted since it was read; \
                     without a resourceVersion it is created)",
                    not_found_message(key)
                );
                console.problem(result_of(key, "not-found"), message)?;
            }
            Err(ObjectStoreError::Conflict {
                expected, found, ..
            }) => {
                let message = format!(
                    "Error from server (Conflict): Operation cannot be fulfilled on {} {:?}: the \
                     object has been modified; please apply your changes to the latest version \
                     and try again (resourceVersion {expected} given, the stored object is at \
                     {found})",
                    resource_name(key.kind),
                    key.name
                );
                console.problem(result_of(key, "conflict"), message)?;
            }
            Err(e) if super::is_forbidden(&e) => {
                console.problem(result_of(key, "forbidden"), forbidden_message(key, "write"))?;
            }
            Err(e) => {
                return abandon(console, "applying", key, &e, objects.len() - index - 1);
            }
        }
    }
    Ok(())
}

/// Deletes the object of each key (`delete -f`: the objects' keys; the
/// rest of them is not looked at): kubectl's `<type> "<name>" deleted`, or
/// its NotFound error.
pub async fn delete<S: ObjectStore>(
    store: &mut S,
    keys: &[ObjectKey],
    console: &mut Console<'_>,
) -> Result<(), CtlError> {
    for (index, key) in keys.iter().enumerate() {
        let path = match path_of(key) {
            Ok(path) => path,
            Err(e) => {
                // No object can be stored there: there is none to delete.
                console.problem(
                    result_of(key, "not-found"),
                    format!("{} ({})", not_found_message(key), e),
                )?;
                continue;
            }
        };
        match store.delete(&path, Expect::Any).await {
            Ok(true) => {
                let line = format!("{} {:?} deleted", type_name(key.kind), key.name);
                console.done(result_of(key, "deleted"), &line)?;
            }
            Ok(false) => {
                console.problem(result_of(key, "not-found"), not_found_message(key))?;
            }
            Err(e) if super::is_forbidden(&e) => {
                console.problem(
                    result_of(key, "forbidden"),
                    forbidden_message(key, "delete"),
                )?;
            }
            Err(e) => {
                return abandon(console, "deleting", key, &e, keys.len() - index - 1);
            }
        }
    }
    Ok(())
}
