//! The test corpus in `testdata/`: every file in `valid/` is accepted and
//! survives the stored form unchanged; every file in `invalid/` is one
//! object the API server would refuse, with the fields it must name
//! (`# field: <path>` lines) and a part of the message (`# message: <text>`).

use std::{fs, path::PathBuf};

use super::{ClusterObject, decode};

fn corpus(dir: &str) -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/model/cluster/testdata")
        .join(dir);
    let mut files: Vec<(String, String)> = fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|entry| {
            let path = entry.expect("entry").path();
            let text = fs::read_to_string(&path).expect("readable");
            (
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                text,
            )
        })
        .collect();
    files.sort();
    files
}

/// The values of `# <tag>: <value>` header lines.
fn header<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    let prefix = format!("# {tag}: ");
    text.lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn valid_objects_are_accepted_and_stored_unchanged() {
    let files = corpus("valid");
    let mut kinds = Vec::new();
    for (name, text) in &files {
        let objects = decode(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!objects.is_empty(), "{name}: no objects");
        for object in objects {
            if let Err(e) = object.validate() {
                panic!("{name}: {e}");
            }
            let bytes = object.to_stored_json().expect("encodes");
            let back = ClusterObject::from_stored_json(&bytes, 7).expect("reads back");
            assert_eq!(back.resource_version(), Some("7"), "{name}");
            assert_eq!(
                back.canonical(),
                object.canonical(),
                "{name}: {}",
                object.key()
            );
            assert_eq!(back.to_stored_json().expect("encodes"), bytes, "{name}");
            assert_eq!(back.key(), object.key(), "{name}");
            // The stored form is still valid (defaulting the namespace
            // breaks nothing).
            back.validate()
                .unwrap_or_else(|e| panic!("{name}: stored: {e}"));
            kinds.push(object.kind());
        }
    }
    for kind in super::ALL_KINDS {
        assert!(kinds.contains(&kind), "no valid {kind} in the corpus");
    }
}

#[test]
fn invalid_objects_are_refused_naming_the_field() {
    let files = corpus("invalid");
    assert!(files.len() > 50, "the corpus is there");
    let mut refused = Vec::new();
    for (name, text) in &files {
        let fields = header(text, "field");
        let messages = header(text, "message");
        assert!(!fields.is_empty() && messages.len() == 1, "{name}: header");
        let objects = decode(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(objects.len(), 1, "{name}");
        let Err(err) = objects[0].validate() else {
            panic!("{name}: accepted");
        };
        for field in &fields {
            assert!(
                err.names_field(field),
                "{name}: {field} not named in: {err}"
            );
        }
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{} {:?} is invalid: ", err.kind, err.name)),
            "{name}: {shown}"
        );
        assert!(
            shown.contains(messages[0]),
            "{name}: {:?} not in: {shown}",
            messages[0]
        );
        // One problem per file unless it lists several: nothing else is
        // refused by accident.
        if fields.len() == 1 {
            assert!(
                err.errors.iter().all(|e| e.field == fields[0]),
                "{name}: {shown}"
            );
        }
        refused.push(objects[0].kind());
    }
    for kind in super::ALL_KINDS {
        assert!(refused.contains(&kind), "no invalid {kind} in the corpus");
    }
}

#[test]
fn the_valid_files_together_are_one_file_of_their_objects() {
    let yaml: Vec<(String, String)> = corpus("valid")
        .into_iter()
        .filter(|(name, _)| {
            std::path::Path::new(name)
                .extension()
                .is_some_and(|e| e == "yaml")
        })
        .collect();
    let each: Vec<String> = yaml
        .iter()
        .flat_map(|(_, text)| decode(text).expect("decodes"))
        .map(|o| o.key().to_string())
        .collect();
    let text = yaml.iter().fold(String::new(), |mut all, (_, text)| {
        all.push_str("---\n");
        all.push_str(text);
        all.push('\n');
        all
    });
    let together: Vec<String> = decode(&text)
        .expect("decodes")
        .iter()
        .map(|o| o.key().to_string())
        .collect();
    assert_eq!(together, each);
    assert!(together.len() > 10, "{together:?}");
}
