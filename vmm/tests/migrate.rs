//! `vmm run` on several memory nodes (issue 11): node policies place the VMs' memory,
//! `--migrate-to` moves it while the guests run and every word still verifies; bad node
//! options exit 2 with a remedy. Needs /dev/kvm for the runs (fails saying so unless
//! SKIP_KVM=1).

mod common;
use common::{kvm, rejects, report};

#[test]
fn a_running_guests_memory_moves_to_another_node_and_verifies() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--migrate-to",
            "1",
            "--workload",
            "fill:seed=1,verify:seed=1,fill:seed=2,verify:seed=2",
            "--json",
        ],
        0,
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["config"]["nodes"], 2);
    // Bound to host NUMA nodes only where the host has two.
    let host = r["config"]["host_numa_nodes"].as_u64().unwrap_or(0);
    assert_eq!(r["config"]["nodes_bound"], host >= 2, "{}", r["config"]);
    let m = &r["migration"];
    assert!(m["stats"]["pages"].as_u64() > Some(16_000), "{m}");
    assert_eq!(m["stats"]["failed"], 0, "{m}");
    assert_eq!(m["stats"]["no_memory"], 0, "{m}");
    assert!(
        m["passes"].as_u64() >= Some(2),
        "moved while running and after: {m}"
    );
    let per = &r["vms"][0]["pages_per_node"];
    let (n0, n1) = (per[0].as_u64().unwrap(), per[1].as_u64().unwrap());
    // The boot region stays (it is locked in memory); the rest moved.
    assert!(n1 > 30_000 && n0 < 1024, "{per}");
}

/// `vmm run` of two 32 MiB VMs on a two-node pool under `policy` (VM k's vCPUs on node
/// k), with `extra` options; its JSON report (exit status 0 expected).
fn two_vms_on_two_nodes(policy: &str, extra: &[&str], workload: &str) -> serde_json::Value {
    let mut args = vec![
        "run", "--mem", "32M", "--vms", "2", "--nodes", "2", "--policy", policy,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--workload", workload, "--json"]);
    report(&args, 0)
}

#[test]
fn policies_place_each_vms_memory() {
    if !kvm() {
        return;
    }
    let per = |policy: &str| -> Vec<Vec<u64>> {
        let r = two_vms_on_two_nodes(policy, &[], "fill,verify");
        assert_eq!(r["verified"], true, "{policy}: {r}");
        r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                v["pages_per_node"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap())
                    .collect()
            })
            .collect()
    };
    // First touch: VM k on node k mod 2.
    let ft = per("first-touch");
    assert!(ft[0][0] > 7000 && ft[0][1] == 0, "{ft:?}");
    assert!(ft[1][1] > 7000 && ft[1][0] == 0, "{ft:?}");
    let bind = per("bind:1");
    assert!(bind.iter().all(|v| v[0] == 0 && v[1] > 7000), "{bind:?}");
    let il = per("interleave");
    assert!(il.iter().all(|v| v[0] > 2000 && v[1] > 2000), "{il:?}");
}

#[test]
fn bad_node_options_exit_2_with_a_remedy() {
    rejects(&["run", "--nodes", "0"], "between 1 and 64");
    rejects(&["run", "--nodes", "65"], "between 1 and 64");
    rejects(
        &["run", "--nodes", "2", "--policy", "bind:2"],
        "nodes are 0 to 1",
    );
    rejects(&["run", "--policy", "sideways"], "first-touch, interleave");
    rejects(&["run", "--migrate-to", "1"], "give --nodes 2 or more");
    rejects(
        &[
            "run",
            "--nodes",
            "2",
            "--migrate-to",
            "1",
            "--migrate-rate",
            "0",
        ],
        "at least 1 MiB",
    );
    rejects(
        &["run", "--nodes", "2", "--vcpu-nodes", "0,2"],
        "give --nodes 3 or more",
    );
    rejects(
        &["fork", "--nodes", "2", "--vcpu-nodes", "5"],
        "give --nodes 6 or more",
    );
}

#[test]
fn a_fork_with_vcpus_on_two_nodes_takes_its_shells_and_verifies() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "fork",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--vcpu-nodes",
            "0,1",
            "--clones",
            "3",
            "--shells",
            "--json",
        ],
        0,
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["config"]["vcpu_nodes"], serde_json::json!([0, 1]));
    // The shells are of the parent's shape, vCPU homes included.
    assert_eq!(r["clones_from_shells"], 3, "{r}");
}

#[test]
fn each_vcpus_slice_is_placed_on_its_own_node() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--vcpu-nodes",
            "1,0",
            "--workload",
            "fill:seed=4,verify:seed=4",
            "--json",
        ],
        0,
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["config"]["vcpu_nodes"], serde_json::json!([1, 0]));
    // vCPU 0 filled the lower slice on node 1, vCPU 1 the upper on node 0 (the boot
    // region the VMM writes goes to the VM's home, the first entry: node 1).
    let per = &r["vms"][0]["pages_per_node"];
    let (n0, n1) = (per[0].as_u64().unwrap(), per[1].as_u64().unwrap());
    assert!(
        n0 >= 8000 && n1 >= 8000,
        "each vCPU's slice on its node: {per}"
    );
}

#[test]
fn the_demo_moves_a_clones_memory_live_and_every_vm_verifies() {
    if !kvm() {
        return;
    }
    let r = report(&["demo", "--clones", "2", "--json"], 0);
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["config"]["nodes"], 2);
    let m = &r["live_move"];
    assert_eq!(m["vm"], "clone 1", "{m}");
    assert_eq!(m["to_node"], 1);
    assert!(m["stats"]["pages"].as_u64() > Some(40_000), "{m}");
    let per = &m["pages_per_node"];
    assert!(
        per[1].as_u64() > Some(40_000) && per[0].as_u64() < Some(1024),
        "clone 1 lives on node 1 now: {per}"
    );
    // The frames the move freed on node 0 went back to the host once it was done.
    let (host, pss) = (
        r["host_mib"].as_f64().unwrap(),
        r["pss_total_mib"].as_f64().unwrap(),
    );
    assert!(host <= pss + 4.0, "host memory {host} MiB, PSS {pss} MiB");
    assert!(
        r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["verified"] == true)
    );
}

#[test]
fn numa_balancing_moves_a_vms_memory_to_its_vcpus_node() {
    if !kvm() {
        return;
    }
    let mut w = String::from("fill");
    // Long enough for several scans (every 20 ms while pages are touched from away).
    for _ in 0..150 {
        w.push_str(",touch");
    }
    w.push_str(",verify");
    let r = two_vms_on_two_nodes("preferred:0", &["--numa-balance", "20"], &w);
    assert_eq!(r["verified"], true, "{r}");
    let b = &r["numa_balance"];
    assert!(b["pages_migrated"].as_u64() > Some(4000), "{b}");
    // VM 1's vCPUs are on node 1: its memory went there; VM 0's stayed on node 0.
    let per = |k: usize, n: usize| r["vms"][k]["pages_per_node"][n].as_u64().unwrap();
    assert!(
        per(1, 1) > 6000 && per(0, 1) == 0,
        "{:?}",
        [per(0, 0), per(0, 1), per(1, 0), per(1, 1)]
    );
}

#[test]
fn a_moves_progress_streams_as_events() {
    if !kvm() {
        return;
    }
    let out = common::vmm(&[
        "run",
        "--mem",
        "64M",
        "--nodes",
        "2",
        "--migrate-to",
        "1",
        "--events",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let passes: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "migrate")
        .collect();
    assert!(!passes.is_empty(), "migrate events");
    let last = passes.last().unwrap();
    assert_eq!(last["to_node"], 1);
    assert!(last["pages"].as_u64() > Some(1000), "{last}");
    // Each pass reports the total so far.
    assert!(
        passes
            .windows(2)
            .all(|w| w[1]["pages"].as_u64() >= w[0]["pages"].as_u64())
    );
}
