//! The `vmm` program's command line: bad input exits with status 2 and a message saying
//! what is wrong (never a panic, never a wrapped-around size); good input runs; a guest
//! still busy at `--timeout` exits 1 naming the VM, vCPU and step (where /dev/kvm exists;
//! without it these KVM cases fail saying so unless SKIP_KVM=1).

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{kvm, rejects, report, vmm};

#[test]
fn bad_sizes_exit_2_with_a_message() {
    rejects(&["run", "--mem", "0"], "non-zero");
    rejects(&["run", "--mem", "3M"], "multiple of 2 MiB");
    rejects(&["run", "--mem", "12Q"], "unknown unit");
    rejects(&["run", "--mem", "128G"], "64 GiB");
    rejects(&["run", "--mem", "1G", "--pool", "512M"], "--pool");
    rejects(&["run", "--mem", "64M", "--pool", "1000"], "4 KiB");
    rejects(&["fork", "--mem", "64M", "--pool", "32M"], "bigger --pool");
    rejects(&["run", "--pool", "16777216T"], "64 bits");
}

#[test]
fn a_pool_beyond_what_frame_numbers_index_exits_2_naming_the_limit() {
    // 16 TiB is 2^32 frames, one more than a frame number names: refused as bad input
    // (before /dev/kvm is opened), not clamped and not reported as a host failure.
    for pool in ["17T", "16T"] {
        let flag = format!("--pool {pool} is too large");
        rejects(&["run", "--pool", pool], &flag);
        rejects(&["run", "--pool", pool], "16 TiB");
        rejects(&["fork", "--pool", pool], &flag);
    }
}

#[test]
fn huge_sizes_and_counts_exit_2_without_a_panic_or_a_wrap() {
    // 1000 VMs of 64 GiB: a default pool of 64 TiB, beyond what frames index.
    rejects(&["run", "--vms", "1000", "--mem", "64G"], "16 TiB");
    // 10000 clones, each rewriting its whole 64 GiB: 640 TiB.
    rejects(
        &[
            "fork",
            "--mem",
            "64G",
            "--clones",
            "10000",
            "--phase1",
            "fill:pages=1",
            "--phase2",
            "fill",
        ],
        "fewer VMs or clones",
    );
    rejects(&["fork", "--clones", "18446744073709551615"], "--clones");
    rejects(&["fork", "--clones", "18446744073709551616"], "--clones");
    rejects(&["run", "--vms", "4294967296"], "--vms");
    rejects(&["run", "--mem", "18446744073709551615"], "--mem");
}

#[test]
fn a_cpu_this_process_cannot_run_on_exits_2_with_a_remedy() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpus.to_string();
    rejects(&["run", "--cpu", &cpu], "leave --cpu out");
    rejects(
        &["fork", "--cpu", &cpu],
        &format!("numbered 0 to {}", cpus - 1),
    );
    rejects(&["run", "--cpu", "18446744073709551616"], "--cpu");
}

#[test]
fn bad_timeouts_exit_2_with_a_message() {
    rejects(&["run", "--timeout", "0"], "more than 0 seconds");
    rejects(&["run", "--timeout=-3"], "more than 0 seconds");
    rejects(&["fork", "--timeout", "soon"], "not a number of seconds");
}

#[test]
fn bad_counts_exit_2_with_a_message() {
    rejects(&["run", "--vcpus", "0"], "--vcpus");
    rejects(&["run", "--vms", "0"], "--vms");
    rejects(&["fork", "--clones", "0"], "--clones");
    rejects(&["run", "--allocator", "buddy"], "magazine");
    rejects(&["run", "--bogus"], "--bogus");
    rejects(&["frobnicate"], "unrecognized subcommand");
}

#[test]
fn malformed_workloads_exit_2_with_a_message() {
    rejects(&["run", "--workload", "fil:seed=1"], "unknown operation");
    rejects(&["run", "--workload", "fill:seed"], "KEY=VALUE");
    rejects(&["run", "--workload", "fill:colour=red"], "unknown key");
    rejects(&["run", "--workload", "fill:seed=one"], "not a number");
    rejects(&["run", "--workload", "fill,,verify"], "empty");
    rejects(
        &["run", "--mem", "8M", "--workload", "fill:pages=4096"],
        "make the guest bigger",
    );
    rejects(
        &[
            "fork",
            "--mem",
            "8M",
            "--phase2",
            "fill:pages=100:stride=300",
        ],
        "only 5 clones fit",
    );
}

#[test]
fn help_documents_the_workload_syntax() {
    let out = vmm(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--workload"), "{text}");
    let out = vmm(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WORKLOAD syntax"), "{text}");
    assert!(text.contains("stride=N"), "{text}");
    let out = vmm(&["fork", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--timeout <SECS>"), "{text}");
    assert!(text.contains("Default: no limit"), "{text}");
}

/// Runs `args` (a guest that cannot finish in a second, with `--timeout 1`), expects exit
/// status 1 soon after the second with a message naming the timeout and each of `needles`.
fn times_out(args: &[&str], needles: &[&str]) {
    let t = Instant::now();
    let out = vmm(args);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    // A hang bound, not a speed claim: the guest alone would run for about a minute.
    assert!(
        took < Duration::from_secs(20),
        "{args:?} took {took:?}: {err}"
    );
    for needle in ["--timeout of 1 s", "vCPU 0"].iter().chain(needles) {
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
    }
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn a_guest_past_its_timeout_exits_1_naming_vm_vcpu_and_step() {
    if !kvm() {
        return;
    }
    // Three steps of the most random accesses a step may ask for: many seconds of guest
    // work even on a fast host (which of them is cut short is not asserted).
    let endless = ["random:count=1073741824:pages=16"; 3].join(",");
    times_out(
        &[
            "run",
            "--mem",
            "8M",
            "--vms",
            "2",
            "--timeout",
            "1",
            "--workload",
            &format!("fill:pages=16,{endless}"),
        ],
        &["VM 0", "step ", "(random)"],
    );
    times_out(
        &[
            "fork",
            "--mem",
            "8M",
            "--clones",
            "2",
            "--timeout",
            "1",
            "--phase1",
            "fill:pages=16",
            "--phase2",
            &endless,
        ],
        &["parent, phase 2", "step ", "(random)"],
    );
    // Within its time the same run passes, pinned to a CPU this process may use.
    let out = vmm(&[
        "run",
        "--mem",
        "8M",
        "--cpu",
        "0",
        "--timeout",
        "60",
        "--workload",
        "fill:pages=16,verify:pages=16",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn run_reports_json_with_every_verify_passed() {
    if !kvm() {
        return;
    }
    let out = vmm(&[
        "run",
        "--mem",
        "16M",
        "--vcpus",
        "2",
        "--vms",
        "2",
        "--workload",
        "fill:seed=3,verify:seed=3,random:seed=7:count=1000,checksum",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["verified"], true);
    assert_eq!(r["frames_returned_at_exit"], true);
    assert_eq!(r["vms"].as_array().map(Vec::len), Some(2));
    let vm = &r["vms"][0];
    assert_eq!(vm["steps"][1]["mismatches"], 0);
    assert!(vm["faults"]["missing_write"].as_u64() > Some(0));
    assert!(vm["memory_pages"]["resident"].as_u64() >= Some(2 * 1792));
}

#[test]
fn fork_reports_every_vm_verified_and_clones_share_memory() {
    if !kvm() {
        return;
    }
    let out = vmm(&[
        "fork",
        "--mem",
        "32M",
        "--clones",
        "3",
        "--phase1",
        "fill:seed=1:pages=2048",
        "--phase2",
        "fill:seed=2:pages=64:stride=64",
        "--grandchild",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["verified"], true);
    assert_eq!(r["frames_returned_at_exit"], true);
    let vms = r["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 5, "parent, 3 clones, a grandchild");
    for v in vms {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["cow_copies"], 64, "{v}");
    }
    // Each clone wrote only its own 64 pages: the rest it shares.
    assert_eq!(vms[2]["memory_pages"]["private"], 64);
    assert_eq!(
        r["clones_from_shells"], 0,
        "no --shells: the fork made every VM"
    );
}

#[test]
fn fork_with_shells_takes_every_clones_vm_from_a_shell() {
    if !kvm() {
        return;
    }
    // With one node the pool is bound to the host's NUMA node 0 and the VMs run on its
    // CPUs: shells must be of that shape too, or no clone can take one.
    for nodes in ["1", "2"] {
        let r = report(
            &[
                "fork",
                "--mem",
                "32M",
                "--clones",
                "3",
                "--nodes",
                nodes,
                "--phase1",
                "fill:seed=1:pages=256",
                "--shells",
                "--json",
            ],
            0,
        );
        assert_eq!(r["verified"], true);
        assert_eq!(r["clones_from_shells"], 3, "--nodes {nodes}: {r}");
    }
}

#[test]
fn host_limits_exit_2_with_a_hint() {
    if !kvm() {
        return;
    }
    // A pool whose descriptors alone would not fit in the host (just under the 16 TiB
    // frames can index: about 190 GB of descriptors).
    rejects(&["run", "--mem", "8M", "--pool", "16383G"], "smaller pool");
    // A step that would run for ever.
    rejects(
        &[
            "run",
            "--mem",
            "8M",
            "--workload",
            "random:count=18446744073709551615",
        ],
        "too large",
    );
    // Too few file descriptors for the VMs asked for.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 40; exec {} run --vms 20 --mem 4M",
                env!("CARGO_BIN_EXE_vmm")
            ),
        ])
        .output()
        .expect("run the vmm binary under a low open-file limit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("open-file limit"), "{err}");
}

#[test]
fn fork_in_place_keeps_the_parents_window_and_verifies() {
    if !kvm() {
        return;
    }
    let report = |parent: &str| {
        let out = vmm(&[
            "fork",
            "--mem",
            "32M",
            "--clones",
            "2",
            "--parent",
            parent,
            "--phase1",
            "fill:seed=1:pages=2048",
            "--phase2",
            "fill:seed=2:pages=64:stride=64",
            "--json",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{parent}: {err}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON report")
    };
    let in_place = report("in-place");
    assert_eq!(in_place["verified"], true);
    assert_eq!(in_place["config"]["parent"], "in-place");
    assert_eq!(in_place["fork_rebirth_ms"], 0.0);
    // The parent's final verify reads pages it kept mapped: no fault at all.
    assert_eq!(in_place["vms"][0]["faults"]["missing_read"], 0);
    let rebirth = report("rebirth");
    assert_eq!(rebirth["verified"], true);
    assert!(rebirth["vms"][0]["faults"]["missing_read"].as_u64() > Some(0));
}
