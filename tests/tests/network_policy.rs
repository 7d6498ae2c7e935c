//! NetworkPolicy end to end, in the shape of the upstream suite
//! (kubernetes test/e2e/network/netpol): a 2-node lab on etcd with the e2e
//! model (namespaces x, y, z; pods a, b, c; every pod serving 80 and 81 on
//! TCP and UDP), probed pod to pod on 80/TCP, 81/TCP, 80/UDP and 81/UDP.
//! The same cases run in vxlan and in direct mode.
//!
//! Without a policy everything is reachable (checked first). Then every
//! policy case (`podnet_tests::netpol::cases`);
//! `PODNET_NETPOL_ONLY=<part of a name>` runs only the cases it names. A
//! failed case prints its tables (`.` as expected, `X` wrong) and the
//! other cases still run; the test fails at the end naming them all.

use std::time::Instant;

use podnet_tests::{
    lab::{LabDatastore, LabGuard},
    netpol::{self, PORT_PROTOCOLS, Reachability, cases},
    privileged,
};

/// Runs only the cases whose name contains this.
const ONLY_ENV: &str = "PODNET_NETPOL_ONLY";

/// The lab with the e2e model and its servers, `down` on drop.
fn e2e_lab(tag: &str, mode: &str) -> LabGuard {
    let mut lab = LabGuard::up(tag, 2, 0, mode, LabDatastore::Etcd).expect("lab up");
    lab.layout
        .add_e2e_model()
        .expect("the e2e model and its servers");
    assert_eq!(lab.layout.pods.len(), 9, "the model's nine pods");
    lab
}

/// No policy: all 81 pairs reachable on every port/protocol.
fn baseline_is_open(lab: &LabGuard) {
    let started = Instant::now();
    let observed = netpol::probe_many(&lab.layout, &PORT_PROTOCOLS).expect("probe");
    eprintln!(
        "FIGURE open probe of {} tables (324 probes): {:.2?}",
        observed.len(),
        started.elapsed()
    );
    let expected = Reachability::model(true);
    for table in &observed {
        netpol::assert_table(&expected, table);
    }
}

fn run_the_cases(lab: &LabGuard, mode: &str) {
    let ctx = cases::Ctx::of(&lab.layout);
    let only = std::env::var(ONLY_ENV).unwrap_or_default();
    let all: Vec<cases::Case> = cases::all(&ctx)
        .into_iter()
        .filter(|c| c.name.contains(&only))
        .collect();
    assert!(!all.is_empty(), "no case matches {ONLY_ENV}={only}");
    let started = Instant::now();
    let failed = netpol::run_cases(&lab.layout, &all);
    eprintln!(
        "FIGURE {} cases in {mode} mode: {:.1?}",
        all.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{} of {} cases failed in {mode} mode: {}\n\n{}",
        failed.len(),
        all.len(),
        failed
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        failed
            .iter()
            .map(|(name, diff)| format!("== {name}\n{diff}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn network_policy_in(tag: &str, mode: &str) {
    let lab = e2e_lab(tag, mode);
    baseline_is_open(&lab);
    run_the_cases(&lab, mode);
}

#[test]
fn network_policy_cases_in_vxlan_mode() {
    if !privileged("network_policy_cases_in_vxlan_mode") {
        return;
    }
    network_policy_in("npv", "vxlan");
}

#[test]
fn network_policy_cases_in_direct_mode() {
    if !privileged("network_policy_cases_in_direct_mode") {
        return;
    }
    network_policy_in("npd", "direct");
}

/// The cases as data, without a lab: enough of them, distinct names, every
/// table of the model's size, and the shapes the suite must cover.
#[test]
fn the_cases_cover_the_suite() {
    let ctx = cases::Ctx {
        ips: [("y/b", [10, 244, 1, 5]), ("z/c", [10, 244, 0, 7])]
            .into_iter()
            .map(|(pod, ip)| (pod.to_owned(), ip.into()))
            .collect(),
        cluster_cidr: "10.244.0.0/16".into(),
    };
    let all = cases::all(&ctx);
    assert!(all.len() >= 25, "{} cases", all.len());
    let names: std::collections::BTreeSet<&str> = all.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), all.len(), "case names are distinct");
    let yaml: String = all
        .iter()
        .flat_map(|c| &c.steps)
        .filter_map(|s| match s {
            cases::Step::Apply(p) => Some(p.iter().map(|p| p.yaml.as_str()).collect::<String>()),
            _ => None,
        })
        .collect();
    for shape in [
        "ingress: [{}]",
        "egress: [{}]",
        "policyTypes: [Egress]",
        "namespaceSelector",
        "except: [10.244.1.5/32]",
        "port: serve-80-tcp",
        "endPort: 81",
        "protocol: UDP",
    ] {
        assert!(yaml.contains(shape), "no case has {shape}");
    }
    for case in &all {
        assert!(
            !case.upstream.is_empty(),
            "{} names no upstream test",
            case.name
        );
        for step in &case.steps {
            if let cases::Step::Expect(expect) = step {
                assert_eq!(expect.0.len(), 4, "{}: four port/protocols", case.name);
                for (_, _, table) in &expect.0 {
                    assert_eq!(table.pods().len(), 9, "{}", case.name);
                }
            }
        }
    }
    assert!(all.iter().any(|c| {
        c.steps
            .iter()
            .any(|s| matches!(s, cases::Step::PodLabels(..)))
    }));
    assert!(all.iter().any(|c| {
        c.steps
            .iter()
            .any(|s| matches!(s, cases::Step::NamespaceLabels(..)))
    }));
    assert!(
        all.iter()
            .any(|c| c.steps.iter().any(|s| matches!(s, cases::Step::Delete(..))))
    );
}
