//! Crash-safe ADD and DEL (issue 11): the plugin or the agent dies by
//! SIGKILL after each step of ADD and of DEL (a fail point, compiled into
//! the test build only: `podnet::failpoint`), and the runtime then does
//! what runtimes do after a failed call: ADD again, DEL, or GC with the
//! attachments it still has; a crashed agent is restarted first, as its
//! supervisor would. Afterwards the node holds exactly what the live
//! attachments need: no address, host veth, agent endpoint, record or map
//! entry more or less, and a pod whose retried ADD succeeded reaches
//! another pod.
//!
//! One test per fail point, so a failure names it.

use std::{os::unix::process::ExitStatusExt as _, time::Duration};

use podnet::failpoint::{self, FailPoint};
use podnet_tests::{
    inventory::Attachment,
    netns::NetNs,
    node::{CniOutput, Node, Pod},
    privileged,
};
use serde_json::Value;

const SIGKILL: i32 = nix::sys::signal::Signal::SIGKILL as i32;

/// Why a fail point might not fire, for the failure message.
const NOT_COMPILED_IN: &str = "fail points exist only in debug builds with the `failpoints` \
     feature, which the tests crate turns on: build with `cargo build --bins` at the workspace \
     root (or `cargo xtask test`), not `-p podnet-user` or `--release`";

fn conf(node: &Node) -> Value {
    node.conf("1.1.0", &Value::Null)
}

/// Arms `point` in the agent: restarts it with the fail point set.
fn arm_agent(node: &mut Node, point: FailPoint) {
    node.stop_agent();
    node.start_agent_with_env(&[(failpoint::ENV, point.name())])
        .expect("agent with the fail point armed");
}

/// Runs `verb` for `container_id` in `netns` with `point` armed (in the
/// plugin's environment, or in a restarted agent's) and checks the process
/// died there by SIGKILL. A crashed agent is restarted, unarmed (its
/// supervisor's job), before this returns.
fn crash(node: &mut Node, point: FailPoint, verb: &str, container_id: &str, netns: &NetNs) {
    let plugin_env = [(failpoint::ENV, point.name())];
    let extra: &[(&str, &str)] = if point.in_agent() {
        arm_agent(node, point);
        &[]
    } else {
        &plugin_env
    };
    let out = node
        .cni_verb(verb, container_id, &netns.path(), extra, &conf(node))
        .expect("run the plugin");
    if point.in_agent() {
        let status = node.wait_agent_exit(Duration::from_secs(10));
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(SIGKILL),
            "the agent did not die at {point} (exit {status:?}); {NOT_COMPILED_IN}\nplugin: {out:?}\nagent log:\n{}",
            node.agent_log()
        );
        // The plugin lost the agent mid-call: the runtime sees a failure.
        assert!(
            !out.success && out.signal.is_none(),
            "{verb} with the agent dying at {point}: {out:?}"
        );
        node.start_agent()
            .expect("the agent's supervisor restarts it");
    } else {
        assert_eq!(
            out.signal,
            Some(SIGKILL),
            "the plugin did not die at {point}: {out:?}; {NOT_COMPILED_IN}"
        );
    }
    assert_no_unfiltered_link(node, point);
}

/// Whatever a crash left, no host veth is up without podnet's filters on
/// it: a pod never sends a packet past its filter.
fn assert_no_unfiltered_link(node: &Node, point: FailPoint) {
    let out = node.netns.ip(&["-j", "link", "show"]).expect("ip link");
    let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let inventory = node.inventory().expect("inventory");
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        let up = link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP"));
        if !name.starts_with("pn") || !up {
            continue;
        }
        let filtered = inventory
            .endpoints
            .iter()
            .any(|e| e.endpoint.host_ifname == name && e.attached && e.in_datapath);
        assert!(
            filtered,
            "after a crash at {point}, host veth {name} is up without podnet's filters: {inventory:#?}"
        );
    }
}

fn assert_exactly(node: &Node, live: &[&Pod], when: &str) {
    let live: Vec<Attachment> = live.iter().map(|p| Attachment::from(*p)).collect();
    node.inventory()
        .expect("inventory")
        .assert_exactly(&live, when);
}

fn assert_ok(out: &CniOutput, what: &str, node: &Node) {
    assert!(
        out.success,
        "{what}: {out:?}\nagent log:\n{}",
        node.agent_log()
    );
}

/// The three things a runtime may do after an ADD that crashed.
fn recover_from_a_crashed_add(node: &mut Node, point: FailPoint, bystander: &Pod) {
    // 1. ADD again: one attachment (not two), and it works.
    let netns = NetNs::new("crash").expect("pod netns");
    crash(node, point, "ADD", "crash-retry", &netns);
    let pod = node
        .add_pod_in(netns, "crash-retry", &conf(node))
        .expect("the retried ADD succeeds");
    assert_exactly(node, &[bystander, &pod], "after a retried ADD");
    assert!(
        pod.ping(bystander.ip, 2),
        "the retried pod reaches another pod"
    );
    assert!(
        bystander.ping(pod.ip, 2),
        "another pod reaches the retried pod"
    );
    let out = node.del_pod(&pod).expect("DEL");
    assert_ok(&out, "DEL of the retried pod", node);
    assert_exactly(node, &[bystander], "after DEL of the retried pod");

    // 2. DEL (the runtime gives the sandbox up).
    let netns = NetNs::new("crash").expect("pod netns");
    crash(node, point, "ADD", "crash-del", &netns);
    let out = node
        .cni_verb("DEL", "crash-del", &netns.path(), &[], &conf(node))
        .expect("DEL");
    assert_ok(&out, "DEL after a crashed ADD", node);
    assert_exactly(node, &[bystander], "after DEL of a crashed ADD");

    // 3. GC with the attachments the runtime still has.
    let netns = NetNs::new("crash").expect("pod netns");
    crash(node, point, "ADD", "crash-gc", &netns);
    let out = node.gc(&[bystander]).expect("GC");
    assert_ok(&out, "GC after a crashed ADD", node);
    assert_exactly(node, &[bystander], "after GC of a crashed ADD");
}

/// The two things a runtime may do after a DEL that crashed.
fn recover_from_a_crashed_del(node: &mut Node, point: FailPoint, bystander: &Pod) {
    // 1. DEL again.
    let pod = node.add_pod("crash-redel").expect("ADD");
    crash(node, point, "DEL", &pod.container_id, &pod.netns);
    let out = node.del_pod(&pod).expect("DEL");
    assert_ok(&out, "the repeated DEL", node);
    assert_exactly(node, &[bystander], "after a repeated DEL");

    // 2. GC with the attachments the runtime still has.
    let pod = node.add_pod("crash-gc").expect("ADD");
    crash(node, point, "DEL", &pod.container_id, &pod.netns);
    let out = node.gc(&[bystander]).expect("GC");
    assert_ok(&out, "GC after a crashed DEL", node);
    assert_exactly(node, &[bystander], "after GC of a crashed DEL");
}

fn crash_and_recover(point: FailPoint, pod_cidr: &str) {
    if !privileged(&format!("crash at {point}")) {
        return;
    }
    let started = std::time::Instant::now();
    let mut node = Node::start("crash", pod_cidr).expect("node");
    let bystander = node.add_pod("bystander").expect("ADD bystander");
    let recoveries = if point.in_add() {
        recover_from_a_crashed_add(&mut node, point, &bystander);
        "ADD again, DEL, GC"
    } else {
        recover_from_a_crashed_del(&mut node, point, &bystander);
        "DEL again, GC"
    };
    // The bystander came through every crash: a new pod reaches it.
    let after = node.add_pod("after").expect("ADD after the crashes");
    assert!(after.ping(bystander.ip, 2), "the bystander still works");
    let out = node.del_pod(&after).expect("DEL");
    assert_ok(&out, "DEL", &node);
    assert_exactly(&node, &[&bystander], "at the end");
    eprintln!(
        "crash at {point} ({}): recovered by {recoveries}, nothing leaked, {:.1} s",
        if point.in_agent() { "agent" } else { "plugin" },
        started.elapsed().as_secs_f64()
    );
}

macro_rules! crash_tests {
    ($($test:ident: $point:ident in $cidr:literal;)*) => {
        $(
            #[test]
            fn $test() {
                crash_and_recover(FailPoint::$point, $cidr);
            }
        )*

        /// Needs no root: a fail point added without its test fails here.
        #[test]
        fn every_fail_point_has_its_test() {
            let tested: std::collections::BTreeSet<&str> =
                [$(FailPoint::$point.name()),*].into_iter().collect();
            let all: std::collections::BTreeSet<&str> =
                FailPoint::ALL.iter().map(|p| p.name()).collect();
            assert_eq!(tested, all);
        }
    };
}

crash_tests! {
    crash_add_after_ipam: AddAfterIpam in "10.244.40.0/24";
    crash_add_after_veth: AddAfterVeth in "10.244.41.0/24";
    crash_add_after_agent: AddAfterAgent in "10.244.42.0/24";
    crash_add_after_host_up: AddAfterHostUp in "10.244.43.0/24";
    crash_add_after_pod_up: AddAfterPodUp in "10.244.44.0/24";
    crash_del_after_release: DelAfterRelease in "10.244.45.0/24";
    crash_del_after_veth: DelAfterVeth in "10.244.46.0/24";
    crash_del_after_agent: DelAfterAgent in "10.244.47.0/24";
    crash_agent_add_after_record: AgentAddAfterRecord in "10.244.48.0/24";
    crash_agent_add_after_attach: AgentAddAfterAttach in "10.244.49.0/24";
    crash_agent_add_after_entry: AgentAddAfterEntry in "10.244.50.0/24";
    crash_agent_del_after_entry: AgentDelAfterEntry in "10.244.51.0/24";
    crash_agent_del_after_record: AgentDelAfterRecord in "10.244.52.0/24";
}
