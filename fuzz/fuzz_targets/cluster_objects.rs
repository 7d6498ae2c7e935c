//! Cluster objects as an operator's file hands them to `apply -f`
//! (`model::cluster::decode`: YAML or JSON, documents, Lists), then the API
//! server's checks (`ClusterObject::validate`), the stored form and the
//! row `get` prints.
//!
//! Input: the file's text (not UTF-8: nothing to decode), also tried as
//! an object's storage key.
//!
//! Invariants: nothing panics; every row has its kind's columns; every refusal names a field and reads as
//! the API server's (`<Kind> "<name>" is invalid: ...`); every object has a
//! stored form that reads back to the same object and the same bytes (so
//! an unchanged object is never written again) and is refused or accepted
//! as the object was; an accepted object's key survives its text form, and
//! any text that parses as a key is that key's text form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podnet::model::cluster::{ClusterObject, ObjectKey, columns, decode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Storage keys: whatever parses is written back the same.
    if let Ok(key) = text.parse::<ObjectKey>() {
        assert_eq!(key.to_string(), text);
    }
    let Ok(objects) = decode(text) else {
        return;
    };
    for object in objects {
        check(&object);
    }
});

fn check(object: &ClusterObject) {
    let verdict = object.validate();
    if let Err(refused) = &verdict {
        assert!(!refused.errors.is_empty());
        assert!(
            refused.errors.iter().all(|e| !e.field.is_empty()),
            "{refused}"
        );
        let shown = refused.to_string();
        let head = format!("{} {:?} is invalid: ", object.kind(), object.name());
        assert!(shown.starts_with(&head), "{shown}");
    }
    assert_eq!(object.row().len(), columns(object.kind()).len());
    let bytes = object.to_stored_json().expect("every object encodes");
    let back = ClusterObject::from_stored_json(&bytes, 1).expect("the stored form reads back");
    assert_eq!(back.canonical(), object.canonical());
    assert_eq!(back.to_stored_json().expect("encodes again"), bytes);
    assert_eq!(back.key(), object.key());
    assert_eq!(
        back.validate().is_ok(),
        verdict.is_ok(),
        "{:?}",
        back.validate()
    );
    if verdict.is_ok() {
        let key = object.key();
        assert_eq!(key.to_string().parse::<ObjectKey>().as_ref(), Ok(&key));
    }
}
