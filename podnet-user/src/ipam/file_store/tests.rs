use std::collections::HashSet;

use super::*;
use crate::ipam::{Allocator, release_holder, release_stale, reservation_of};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podnet-ipam-test-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn holder(network: &str, id: &str) -> Holder {
    Holder::new(
        network,
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        },
    )
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn range(cidr: &str) -> PodRange {
    PodRange::new(cidr.parse().unwrap()).unwrap()
}

#[test]
fn records_survive_reopen_and_leftovers_are_cleaned() {
    let root = temp_dir("reopen");
    let _cleanup = Cleanup(root.clone());
    let dir = root.join(NODE_STORE_DIR);
    let range = range("10.244.3.0/24");
    let ip = Allocator::new(range, FileStore::open(&root).unwrap())
        .allocate(&holder("podnet", "a"))
        .unwrap()
        .ip;
    assert_eq!(
        fs::read_to_string(dir.join(ip.to_string())).unwrap(),
        "a\neth0\npodnet\n"
    );
    // What a crash can leave: a temp file; and a foreign empty record,
    // and one without the network line.
    fs::write(dir.join(".tmp-10.244.3.9-1"), "").unwrap();
    fs::write(dir.join("10.244.3.10"), "").unwrap();
    fs::write(dir.join("10.244.3.11"), "x\neth0\n").unwrap();
    let alloc = Allocator::new(range, FileStore::open(&root).unwrap());
    let again = alloc.allocate(&holder("podnet", "a")).unwrap();
    assert!(again.existing);
    assert_eq!(again.ip, ip);
    assert_eq!(alloc.reservations().unwrap().len(), 1);
    assert!(!dir.join(".tmp-10.244.3.9-1").exists());
    for name in ["10.244.3.10", "10.244.3.11"] {
        assert!(
            !dir.join(name).exists(),
            "an unreadable record holds no address"
        );
    }
}

#[test]
fn concurrent_allocators_of_two_networks_never_share_an_address() {
    let root = temp_dir("concurrent");
    let _cleanup = Cleanup(root.clone());
    let range = range("10.244.4.0/27");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|n| {
                let root = root.clone();
                s.spawn(move || {
                    let network = if n % 2 == 0 { "net-a" } else { "net-b" };
                    Allocator::new(range, FileStore::open(&root).unwrap())
                        .allocate(&holder(network, &format!("c{n}")))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: HashSet<_> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|a| a.ip))
        .collect();
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(IpamError::Exhausted { .. })))
        .count();
    assert_eq!(ok.len(), 29, "every free address handed out exactly once");
    assert_eq!(exhausted, 11);
}

#[test]
fn two_networks_alternating_share_one_store() {
    let root = temp_dir("two-nets");
    let _cleanup = Cleanup(root.clone());
    let alloc = Allocator::new(range("10.244.6.0/24"), FileStore::open(&root).unwrap());
    let mut seen = HashSet::new();
    for n in 0..50 {
        let network = if n % 2 == 0 { "net-a" } else { "net-b" };
        let a = alloc.allocate(&holder(network, &format!("c{n}"))).unwrap();
        assert!(seen.insert(a.ip), "{} handed out twice", a.ip);
    }
    // Same container in both networks: two addresses.
    let a = alloc.allocate(&holder("net-a", "both")).unwrap().ip;
    let b = alloc.allocate(&holder("net-b", "both")).unwrap().ip;
    assert_ne!(a, b);
    // DEL in net-a, GC of net-a: net-b keeps everything.
    let store = FileStore::open(&root).unwrap();
    assert_eq!(
        release_holder(&store, &holder("net-a", "both")).unwrap(),
        vec![a]
    );
    let released = release_stale(&store, "net-a", &[]).unwrap();
    assert_eq!(released.len(), 25);
    assert!(released.iter().all(|r| r.holder.network == "net-a"));
    let left = alloc.reservations().unwrap();
    assert_eq!(left.len(), 26);
    assert!(left.iter().all(|r| r.holder.network == "net-b"));
    assert_eq!(
        reservation_of(&store, &holder("net-b", "both"))
            .unwrap()
            .map(|r| r.ip),
        Some(b)
    );
    assert_eq!(
        reservation_of(&store, &holder("net-a", "both")).unwrap(),
        None
    );
    // Only the node store exists: no per-network directories.
    let names: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![NODE_STORE_DIR.to_owned()]);
}

/// What podnet before the shared store left: one directory per network.
fn write_old_layout(root: &Path, network: &str, records: &[(&str, &str)], cursor: &str) {
    let dir = root.join(network);
    fs::create_dir_all(&dir).unwrap();
    for (ip, id) in records {
        fs::write(dir.join(ip), format!("{id}\neth0\n")).unwrap();
    }
    fs::write(dir.join(LOCK_FILE), "").unwrap();
    fs::write(dir.join(CURSOR_FILE), cursor).unwrap();
}

#[test]
fn old_layout_stores_are_honoured_and_released() {
    let root = temp_dir("old-layout");
    let _cleanup = Cleanup(root.clone());
    write_old_layout(
        &root,
        "podnet",
        &[("10.244.5.2", "old-a"), ("10.244.5.3", "old-b")],
        "10.244.5.3",
    );
    write_old_layout(&root, "other", &[("10.244.5.4", "old-c")], "10.244.5.4");
    let store = FileStore::open(&root).unwrap();
    let alloc = Allocator::new(range("10.244.5.0/29"), store.clone());

    let found: Vec<_> = alloc
        .reservations()
        .unwrap()
        .into_iter()
        .map(|r| (r.ip.to_string(), r.holder))
        .collect();
    assert_eq!(
        found,
        vec![
            ("10.244.5.2".to_owned(), holder("podnet", "old-a")),
            ("10.244.5.3".to_owned(), holder("podnet", "old-b")),
            ("10.244.5.4".to_owned(), holder("other", "old-c")),
        ]
    );
    // A repeated ADD of a pod added before the upgrade: its address.
    let again = alloc.allocate(&holder("podnet", "old-a")).unwrap();
    assert!(again.existing);
    assert_eq!(again.ip, ip("10.244.5.2"));
    // New pods of either network get what no old store holds, after
    // the old layout's cursor; then the range is full.
    let n1 = alloc.allocate(&holder("podnet", "new-1")).unwrap().ip;
    let n2 = alloc.allocate(&holder("other", "new-2")).unwrap().ip;
    assert_eq!((n1, n2), (ip("10.244.5.5"), ip("10.244.5.6")));
    assert!(matches!(
        alloc.allocate(&holder("other", "new-3")),
        Err(IpamError::Exhausted { used: 5, .. })
    ));
    assert_eq!(
        fs::read_to_string(root.join(NODE_STORE_DIR).join("10.244.5.5")).unwrap(),
        "new-1\neth0\npodnet\n",
        "new records go to the node store"
    );
    assert!(!root.join("podnet").join("10.244.5.5").exists());

    // DEL of a pre-upgrade pod: only in its own network.
    assert!(
        release_holder(&store, &holder("other", "old-a"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        release_holder(&store, &holder("podnet", "old-a")).unwrap(),
        vec![ip("10.244.5.2")]
    );
    assert!(!root.join("podnet/10.244.5.2").exists());
    assert!(root.join("podnet/10.244.5.3").exists());
    // GC of podnet: its old and new records go, other's stay.
    let mut released: Vec<_> = release_stale(&store, "podnet", &[])
        .unwrap()
        .into_iter()
        .map(|r| r.ip)
        .collect();
    released.sort();
    assert_eq!(released, vec![ip("10.244.5.3"), ip("10.244.5.5")]);
    assert!(
        !root.join("podnet").exists(),
        "an emptied old-layout directory is removed"
    );
    assert!(root.join("other/10.244.5.4").exists());
    let left: Vec<_> = alloc
        .reservations()
        .unwrap()
        .into_iter()
        .map(|r| r.ip)
        .collect();
    assert_eq!(left, vec![ip("10.244.5.4"), ip("10.244.5.6")]);
    // The freed addresses are handed out again, never other's.
    let n3 = alloc.allocate(&holder("podnet", "new-3")).unwrap().ip;
    assert!([ip("10.244.5.2"), ip("10.244.5.3"), ip("10.244.5.5")].contains(&n3));
}

#[test]
fn an_address_two_old_stores_handed_out_stays_taken_until_both_release_it() {
    let root = temp_dir("old-dup");
    let _cleanup = Cleanup(root.clone());
    // The bug of issue 10, as it lies on disk after the upgrade.
    write_old_layout(&root, "net-a", &[("10.244.5.2", "pod-a")], "10.244.5.2");
    write_old_layout(&root, "net-b", &[("10.244.5.2", "pod-b")], "10.244.5.2");
    let store = FileStore::open(&root).unwrap();
    let alloc = Allocator::new(range("10.244.5.0/30"), store.clone());
    assert_eq!(alloc.reservations().unwrap().len(), 2);
    assert!(matches!(
        alloc.allocate(&holder("net-a", "new")),
        Err(IpamError::Exhausted { .. })
    ));
    release_holder(&store, &holder("net-a", "pod-a")).unwrap();
    assert!(
        alloc.allocate(&holder("net-a", "new")).is_err(),
        "net-b's pod still has it"
    );
    release_holder(&store, &holder("net-b", "pod-b")).unwrap();
    assert_eq!(
        alloc.allocate(&holder("net-a", "new")).unwrap().ip,
        ip("10.244.5.2")
    );
    assert!(!root.join("net-a").exists() && !root.join("net-b").exists());
}

#[test]
fn empty_old_layout_dirs_are_removed_and_their_cursor_kept() {
    let root = temp_dir("old-empty");
    let _cleanup = Cleanup(root.clone());
    write_old_layout(&root, "gone", &[], "10.244.5.9");
    write_old_layout(&root, "kept", &[("10.244.5.2", "p")], "10.244.5.2");
    // Not a network name: not a store, left alone.
    fs::create_dir_all(root.join("-x")).unwrap();
    let store = FileStore::open(&root).unwrap();
    // Before the tidy the newest old cursor is where allocation goes on.
    let now = SystemTime::now();
    File::options()
        .write(true)
        .open(root.join("gone").join(CURSOR_FILE))
        .unwrap()
        .set_modified(now)
        .unwrap();
    File::options()
        .write(true)
        .open(root.join("kept").join(CURSOR_FILE))
        .unwrap()
        .set_modified(now - Duration::from_mins(1))
        .unwrap();
    assert_eq!(store.last_reserved().unwrap(), Some(ip("10.244.5.9")));
    assert_eq!(
        store.remove_empty_old_layout_dirs().unwrap(),
        vec!["gone".to_owned()]
    );
    assert!(!root.join("gone").exists());
    assert!(root.join("kept/10.244.5.2").exists());
    assert!(root.join("-x").exists());
    assert_eq!(
        fs::read_to_string(root.join(NODE_STORE_DIR).join(CURSOR_FILE)).unwrap(),
        "10.244.5.9",
        "the cursor moved to the node store"
    );
}

#[test]
fn a_second_data_dir_on_the_node_is_refused_while_the_first_holds_addresses() {
    let base = temp_dir("claim");
    let _cleanup = Cleanup(base.clone());
    let range = range("10.244.7.0/24");
    let home = FileStore::open(&base.join("agent")).unwrap();
    let other = FileStore::open(&base.join("data-dir")).unwrap();
    // The home store (no dataDir) serves the node and holds a pod.
    let a = Allocator::new(range, home.clone().claim_node(&home, range).unwrap());
    a.allocate(&holder("net-a", "pod")).unwrap();
    // A network with another dataDir is refused, with a message that
    // names both stores, what is in use and the way out.
    let err = other.clone().claim_node(&home, range).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IpamError::StoreConflict { .. }), "{msg}");
    for part in [
        "10.244.7.0/24",
        home.root().to_str().unwrap(),
        other.root().to_str().unwrap(),
        "1 address in use by network net-a",
        "ipam.dataDir",
    ] {
        assert!(msg.contains(part), "{part:?} missing in: {msg}");
    }
    // Another spelling of the home root is the home store.
    let again = FileStore::open(&base.join("agent/../agent/")).unwrap();
    Allocator::new(range, again.claim_node(&home, range).unwrap())
        .allocate(&holder("net-b", "pod"))
        .unwrap();

    // Cleared for the home store now, allocating later.
    let stale = Allocator::new(range, home.clone().claim_node(&home, range).unwrap());

    // Once the home store is empty, the other one may take over...
    release_stale(&home, "net-a", &[]).unwrap();
    release_stale(&home, "net-b", &[]).unwrap();
    let b = Allocator::new(range, other.clone().claim_node(&home, range).unwrap());
    b.allocate(&holder("net-c", "pod")).unwrap();
    assert_eq!(home.serving_store().unwrap().root(), other.root());
    // ... and the allocation cleared before that is refused at its
    // lock, not handed a second copy of the node's addresses.
    let err = stale.allocate(&holder("net-a", "late")).unwrap_err();
    assert!(matches!(err, IpamError::StoreConflict { .. }), "{err}");
    assert!(home.reservations().unwrap().is_empty(), "nothing written");
    // Now the home store is the second one.
    let err = home.clone().claim_node(&home, range).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("under {} (1 address", other.root().display())),
        "{err}"
    );
    // Empty again: the home store takes the node back.
    release_holder(&other, &holder("net-c", "pod")).unwrap();
    let back = Allocator::new(range, home.clone().claim_node(&home, range).unwrap());
    back.allocate(&holder("net-a", "pod")).unwrap();
    assert_eq!(home.serving_store().unwrap().root(), home.root());
    assert!(!home.dir().join(SERVED_BY_FILE).exists());
}
