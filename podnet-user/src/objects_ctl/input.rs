//! `-f FILE|DIR|-`: the operator's files to objects. Everything is read and
//! decoded before anything is written, so that a bad file leaves the
//! datastore as it was.

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::model::cluster::{ClusterObject, DecodeError, NamespaceMismatch, decode};

/// How standard input is named in messages (as kubectl names it).
pub const STDIN_NAME: &str = "STDIN";

/// One input: its name for messages (a path, or [`STDIN_NAME`]) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Error)]
pub enum InputError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading standard input: {0}")]
    Stdin(#[source] io::Error),
    #[error("standard input (-) given twice")]
    StdinTwice,
    #[error("{name}: {source}")]
    Decode {
        name: String,
        #[source]
        source: DecodeError,
    },
    /// `-n` against an object's own namespace.
    #[error("{source}")]
    Namespace {
        #[source]
        source: NamespaceMismatch,
    },
    #[error("no objects passed to {0}")]
    Empty(&'static str),
}

/// The texts of `paths`: `-` is `stdin` (once), a directory its `.yaml`,
/// `.yml` and `.json` files in name order (not its subdirectories, as
/// kubectl without `-R`), anything else the file.
pub fn read_sources(paths: &[PathBuf], mut stdin: impl Read) -> Result<Vec<Source>, InputError> {
    let mut sources = Vec::new();
    let mut stdin_read = false;
    for path in paths {
        if path.as_os_str() == "-" {
            if stdin_read {
                return Err(InputError::StdinTwice);
            }
            stdin_read = true;
            let mut text = String::new();
            stdin.read_to_string(&mut text).map_err(InputError::Stdin)?;
            sources.push(Source {
                name: STDIN_NAME.to_owned(),
                text,
            });
        } else if path.is_dir() {
            for file in directory_files(path)? {
                sources.push(read_file(&file)?);
            }
        } else {
            sources.push(read_file(path)?);
        }
    }
    Ok(sources)
}

fn read_file(path: &Path) -> Result<Source, InputError> {
    let text = fs::read_to_string(path).map_err(|source| InputError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

fn directory_files(dir: &Path) -> Result<Vec<PathBuf>, InputError> {
    let read = |source| InputError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let manifest = path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
        if manifest && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The objects of `sources`, in order, with `-n namespace` applied (a
/// namespaced object without a namespace goes there; one naming another is
/// refused, as kubectl refuses it). `command` names the command when there
/// is nothing to do.
pub fn objects_of(
    sources: &[Source],
    namespace: Option<&str>,
    command: &'static str,
) -> Result<Vec<ClusterObject>, InputError> {
    let mut objects = Vec::new();
    for source in sources {
        let decoded = decode(&source.text).map_err(|e| InputError::Decode {
            name: source.name.clone(),
            source: e,
        })?;
        objects.extend(decoded);
    }
    if let Some(namespace) = namespace {
        for object in &mut objects {
            object
                .set_namespace_from_flag(namespace)
                .map_err(|source| InputError::Namespace { source })?;
        }
    }
    if objects.is_empty() {
        return Err(InputError::Empty(command));
    }
    Ok(objects)
}
