//! `vmm run` and `vmm fork` with swap (issue 10): a guest twice its host memory verifies
//! and the JSON shows what went to swap and came back; bad swap options exit 2 with a
//! remedy. Needs /dev/kvm for the runs (fails saying so unless SKIP_KVM=1).

mod common;
use common::{kvm, rejects, report, vmm};

#[test]
fn a_run_in_twice_its_host_memory_verifies_and_reports_swap() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "64M",
            "--host-memory",
            "32M",
            "--workload",
            "fill:seed=3,verify:seed=3",
            "--json",
        ],
        0,
    );
    assert_eq!(r["verified"], true);
    assert_eq!(r["frames_returned_at_exit"], true);
    assert_eq!(r["pool_bytes"].as_u64(), Some(32 << 20));
    let swap = &r["swap"];
    assert!(swap["device"]["bytes_written"].as_u64() > Some(0), "{swap}");
    assert!(swap["reclaim"]["major_faults"].as_u64() > Some(0), "{swap}");
    assert!(r["vms"][0]["counters"]["swapins"].as_u64() > Some(0));
    let path = swap["path"].as_str().expect("the swap file's path");
    assert_eq!(r["config"]["swap_path"].as_str(), Some(path));
    assert_eq!(r["config"]["host_memory_bytes"].as_u64(), Some(32 << 20));
    assert_eq!(swap["pool_bytes"].as_u64(), Some(32 << 20));
    assert_eq!(swap["touched_bytes"].as_u64(), Some(64 << 20));
    assert!(
        !std::path::Path::new(path).exists(),
        "the swap file is removed at exit"
    );
}

#[test]
fn a_fork_in_overcommit_verifies_every_vm() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "fork",
            "--mem",
            "64M",
            "--clones",
            "4",
            "--host-memory",
            "40M",
            "--phase1",
            "fill:seed=1",
            "--phase2",
            "fill:seed=2:pages=8M:stride=8M",
            "--json",
        ],
        0,
    );
    assert_eq!(r["verified"], true);
    assert!(r["swap"]["reclaim"]["written"].as_u64() > Some(0));
    let vms = r["vms"].as_array().expect("the VMs");
    assert_eq!(vms.len(), 5);
    assert!(
        vms.iter().all(|v| v["swap"]["swapins"].as_u64().is_some()),
        "every VM has its swap figures: {vms:?}"
    );
    let refaults: u64 = vms
        .iter()
        .filter_map(|v| v["swap"]["swapins"].as_u64())
        .sum();
    assert!(refaults > 0, "pages came back from swap");
}

#[test]
fn without_swap_the_json_has_no_swap_fields() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "16M",
            "--workload",
            "fill:seed=3,verify:seed=3",
            "--json",
        ],
        0,
    );
    assert!(r.get("swap").is_none(), "{r}");
    assert!(r["config"].get("swap_path").is_none(), "{r}");
    assert!(r["config"].get("host_memory_bytes").is_none(), "{r}");
}

#[test]
fn the_demo_runs_an_overcommit_phase_where_every_vm_verifies() {
    if !kvm() {
        return;
    }
    let out = vmm(&["demo", "--clones", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}{err}");
    let (_, oc) = text
        .split_once("Overcommit:")
        .unwrap_or_else(|| panic!("no overcommit phase in {text}"));
    assert!(oc.contains("of host memory (--host-memory"), "{oc}");
    assert!(
        oc.contains("swapped  refaults"),
        "the table shows swap: {oc}"
    );
    assert!(oc.contains("MiB written"), "the swap summary: {oc}");
    assert!(
        oc.contains("overcommit: the workloads can touch"),
        "pool vs touched: {oc}"
    );
    assert!(oc.contains("every VM verified: yes"), "{oc}");
}

/// What the demo's overcommit phase must show in its JSON report.
fn assert_overcommit_phase(r: &serde_json::Value) {
    let oc = &r["overcommit"];
    assert_eq!(oc["verified"], true, "{oc}");
    assert_eq!(
        oc["vms"].as_array().map(Vec::len),
        Some(5),
        "a parent and 4 clones"
    );
    let swap = &oc["swap"];
    assert!(
        swap["touched_bytes"].as_u64() >= swap["pool_bytes"].as_u64().map(|b| 2 * b),
        "the VMs touch twice their host memory: {swap}"
    );
    assert!(swap["device"]["bytes_written"].as_u64() > Some(0), "{swap}");
    assert!(swap["reclaim"]["major_faults"].as_u64() > Some(0), "{swap}");
    assert_eq!(
        r["every_phase_verified"],
        r["verified"].as_bool() == Some(true) && oc["verified"].as_bool() == Some(true),
        "the demo's verdict covers both phases"
    );
    assert_eq!(r["every_phase_verified"], true);
}

#[test]
fn the_demos_json_and_events_carry_the_overcommit_phase() {
    if !kvm() {
        return;
    }
    let r = report(&["demo", "--clones", "2", "--json"], 0);
    assert_eq!(r["verified"], true);
    assert!(
        r.get("swap").is_none(),
        "the first phase runs without swap: {r}"
    );
    assert_overcommit_phase(&r);

    let out = vmm(&["demo", "--clones", "2", "--events"]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let stage = lines
        .iter()
        .position(|l| {
            l["event"] == "stage"
                && l["what"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("overcommit phase"))
        })
        .expect("a stage event opens the overcommit phase");
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i]["event"] == "start")
        .collect();
    assert_eq!(starts.len(), 2, "each phase starts with its configuration");
    assert!(starts[0] < stage && stage < starts[1]);
    let last = lines.last().expect("events");
    assert_eq!(last["event"], "report");
    assert_overcommit_phase(&last["report"]);
}

#[test]
fn bad_swap_options_exit_2_with_a_remedy() {
    rejects(
        &[
            "run",
            "--mem",
            "64M",
            "--swap",
            "/nonexistent/dir/x",
            "--workload",
            "fill",
        ],
        "/nonexistent/dir/x",
    );
    rejects(
        &["run", "--mem", "64M", "--pool", "16M", "--workload", "fill"],
        "--swap",
    );
    rejects(
        &[
            "run",
            "--mem",
            "64M",
            "--pool",
            "16M",
            "--host-memory",
            "32M",
            "--workload",
            "fill",
        ],
        "keep one",
    );
}
