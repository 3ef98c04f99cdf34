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
