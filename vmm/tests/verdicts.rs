//! Every verdict `vmm` prints is earned: each check is run once on an input where it must
//! fail, through every subcommand, and the exit status, the table and the JSON all say
//! so. Also: a report that cannot be written, Ctrl-C, `--events`, and input that used to
//! be accepted silently. (Where /dev/kvm is missing the KVM cases fail saying so, unless
//! SKIP_KVM=1.)

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{kvm, rejects, report, vmm};

fn rows(r: &Value) -> &Vec<Value> {
    r["vms"].as_array().expect("vms")
}

const WORDS_PER_PAGE: u64 = 512;

#[test]
fn a_failing_verify_in_run_exits_1_with_its_bad_words() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "16M",
            "--vcpus",
            "2",
            "--workload",
            "fill:seed=1:pages=8,verify:seed=1:pages=8,verify:seed=3:pages=8",
            "--json",
        ],
        1,
    );
    assert_eq!(r["verified"], false);
    let vm = &rows(&r)[0];
    assert_eq!(vm["verified"], false);
    assert_eq!(vm["steps"][1]["mismatches"], 0, "the right seed verifies");
    // Every word of 8 pages on each of 2 vCPUs is wrong under another seed.
    assert_eq!(vm["steps"][2]["mismatches"], 2 * 8 * WORDS_PER_PAGE);
    assert_eq!(vm["mismatches"], 2 * 8 * WORDS_PER_PAGE);
    assert_eq!(vm["steps"][0]["op"], "fill", "op names as in the syntax");
    // And the control: the same run without the bad verify passes.
    let ok = report(
        &[
            "run",
            "--mem",
            "16M",
            "--workload",
            "fill:seed=1:pages=8,verify:seed=1:pages=8",
            "--json",
        ],
        0,
    );
    assert_eq!(ok["verified"], true);
}

#[test]
fn a_failing_second_phase_verify_in_fork_counts_for_every_vm_and_the_grandchild() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "fork",
            "--mem",
            "16M",
            "--clones",
            "2",
            "--grandchild",
            "--phase1",
            "fill:seed=1:pages=64",
            "--phase2",
            "verify:seed=99:pages=4",
            "--json",
        ],
        1,
    );
    assert_eq!(r["verified"], false);
    let vms = rows(&r);
    let roles: Vec<_> = vms
        .iter()
        .map(|v| v["role"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(roles, ["parent", "clone 1", "clone 2", "clone 1.1"]);
    for v in vms {
        assert_eq!(v["verified"], false, "{}", v["role"]);
        assert_eq!(v["step_mismatches"], 4 * WORDS_PER_PAGE, "{}", v["role"]);
        assert_eq!(v["final_mismatches"], 0, "{}", v["role"]);
        let last = v["steps"].as_array().and_then(|s| s.last()).expect("steps");
        assert_eq!((&last["phase"], &last["op"]), (&2.into(), &"verify".into()));
    }
}

#[test]
fn a_final_verify_that_finds_a_flipped_word_fails_exactly_that_vm() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "fork",
            "--mem",
            "16M",
            "--clones",
            "3",
            "--phase1",
            "fill:seed=1:pages=64",
            "--phase2",
            "fill:seed=2:pages=4:stride=4",
            "--corrupt",
            "clone 2",
            "--json",
        ],
        1,
    );
    for v in rows(&r) {
        let bad = v["role"] == "clone 2";
        assert_eq!(v["verified"], !bad, "{v}");
        assert_eq!(v["final_mismatches"], u64::from(bad), "{v}");
    }
    // The text table names it too.
    let out = vmm(&[
        "fork",
        "--mem",
        "16M",
        "--clones",
        "3",
        "--phase1",
        "fill:seed=1:pages=64",
        "--corrupt",
        "parent",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("parent: the final verify found 1 bad words"),
        "{text}"
    );
    assert!(text.contains("every VM verified: NO"), "{text}");
}

#[test]
fn demo_fails_when_the_grandchild_does() {
    if !kvm() {
        return;
    }
    let r = report(
        &["demo", "--clones", "2", "--corrupt", "clone 1.1", "--json"],
        1,
    );
    assert_eq!(r["verified"], false);
    let vms = rows(&r);
    assert_eq!(vms.len(), 4);
    for v in vms {
        let bad = v["role"] == "clone 1.1";
        assert_eq!(v["verified"], !bad, "{v}");
        assert_eq!(v["final_mismatches"], u64::from(bad), "{v}");
        assert_eq!(v["mismatches"], u64::from(bad), "{v}");
    }
    rejects(&["demo", "--corrupt", "clone 9"], "no such VM");
}

#[test]
fn a_crashing_guest_is_reported_with_what_ran_before_it() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "16M",
            "--vms",
            "2",
            "--workload",
            "fill:pages=4,crash",
            "--json",
        ],
        1,
    );
    assert_eq!(r["verified"], false);
    for (i, v) in rows(&r).iter().enumerate() {
        assert_eq!(v["steps"].as_array().map(Vec::len), Some(1), "{v}");
        let e = v["error"].as_str().expect("an error");
        assert!(e.contains(&format!("VM {i}")) && e.contains("crash"), "{e}");
    }
}

#[test]
fn a_report_to_a_full_disk_is_an_error_and_to_a_closed_pipe_is_not() {
    if !kvm() {
        return;
    }
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--mem", "16M", "--workload", "fill:pages=4"])
        .stdout(full)
        .output()
        .expect("run vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write the report"), "{err}");
    // The event stream too.
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "run",
            "--mem",
            "16M",
            "--workload",
            "fill:pages=4",
            "--events",
        ])
        .stdout(full)
        .output()
        .expect("run vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("cannot write").count(), 1, "said once: {err}");
    // A pipe whose reader has gone: quiet, no panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--mem", "16M", "--workload", "fill:pages=4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    drop(child.stdout.take());
    let status = child.wait().expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// Runs `vmm args` and sends it SIGINT (Ctrl-C) 1.5 s after it started.
fn interrupted(args: &[&str]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait_with_output().expect("wait")
}

#[test]
fn ctrl_c_prints_the_partial_report_and_exits_130() {
    if !kvm() {
        return;
    }
    let out = interrupted(&[
        "run",
        "--mem",
        "16M",
        "--workload",
        "fill:seed=1:pages=8,random:count=1000000000,verify:seed=1:pages=8",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("Ctrl-C"), "{err}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("the partial report");
    assert_eq!(r["verified"], false);
    let vm = &rows(&r)[0];
    assert_eq!(
        vm["steps"].as_array().map(Vec::len),
        Some(1),
        "only the fill ran"
    );
    assert!(
        vm["error"]
            .as_str()
            .is_some_and(|e| e.contains("step 2 (random)"))
    );
}

#[test]
fn ctrl_c_stops_a_fork_while_it_makes_its_shells() {
    if !kvm() {
        return;
    }
    // 3000 shells take several seconds to make: the signal lands while they are made.
    let out = interrupted(&[
        "fork",
        "--clones",
        "3000",
        "--mem",
        "4M",
        "--shells",
        "--phase2",
        "dirty:pages=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("making the clones' VM shells") && err.contains("of 3000 made"),
        "stopped while making the shells, not after: {err}"
    );
}

#[test]
fn events_stream_one_json_line_each_with_the_report_last() {
    if !kvm() {
        return;
    }
    let out = vmm(&[
        "fork",
        "--mem",
        "16M",
        "--clones",
        "2",
        "--phase1",
        "fill:seed=1:pages=16",
        "--phase2",
        "fill:seed=2:pages=4:stride=4",
        "--events",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"start"));
    assert_eq!(names.last(), Some(&"report"));
    assert_eq!(names.iter().filter(|&&n| n == "verified").count(), 3);
    assert_eq!(names.iter().filter(|&&n| n == "step").count(), 1 + 3);
    let last = &lines[lines.len() - 1]["report"];
    assert_eq!(last["verified"], true);
    assert_eq!(last["config"]["phase2"], "fill:seed=2:pages=4:stride=4");
}

#[test]
fn json_records_the_configuration_and_keeps_64_bit_results_exact() {
    if !kvm() {
        return;
    }
    let r = report(
        &[
            "run",
            "--mem",
            "16M",
            "--allocator",
            "percpu",
            "--rmap",
            "flat",
            "--workload",
            "fill:pages=4,checksum:pages=4",
            "--json",
        ],
        0,
    );
    let c = &r["config"];
    assert_eq!(c["allocator"], "percpu");
    assert_eq!(c["rmap"], "flat");
    assert_eq!(c["workload"], "fill:pages=4,checksum:pages=4");
    let sum = r["vms"][0]["steps"][1]["result"]
        .as_str()
        .expect("a string");
    assert!(
        u64::from_str_radix(sum.trim_start_matches("0x"), 16).is_ok(),
        "{sum}"
    );
}

#[test]
fn limits_are_checked_up_front_against_their_real_cause() {
    // The parent's own second-phase writes count: 256 MiB + 9 x 1 MiB.
    rejects(
        &["fork", "--pool", "264M", "--clones", "8"],
        "need at least 265 MiB",
    );
    rejects(&["demo", "--clones", "30"], "between 1 and 29 for the demo");
    rejects(&["fork", "--clones", "255"], "only 254 clones fit");
    rejects(
        &["run", "--workload", "fill:stride=4"],
        "stride applies only",
    );
    rejects(&["run", "--corrupt", "parent"], "--corrupt is for fork");
    // More than this host has: 64 GiB guests, enough of them.
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib = |f: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(f))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            };
            Some(kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0))
        })
        .expect("/proc/meminfo");
    let vms = (avail >> 26) + 1; // 64 GiB is 2^26 KiB
    rejects(
        &["run", "--mem", "64G", "--vms", &vms.to_string()],
        "MemAvailable",
    );
}

#[test]
fn nonsense_that_used_to_be_ignored_is_refused() {
    rejects(&["run", "--workload", "fill:seed=1:seed=2"], "given twice");
    rejects(&["run", "--workload", "fill:count=9"], "does not use count");
    rejects(
        &["run", "--workload", "checksum:seed=9"],
        "does not use seed",
    );
    rejects(
        &["run", "--workload", "fill:offset=1K"],
        "whole number of 4 KiB pages",
    );
    rejects(&["run", "--workload", "crash:pages=1"], "takes no key");
}

#[test]
fn version_and_exit_codes_are_documented() {
    let out = vmm(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vmm "));
    for sub in ["run", "fork"] {
        let out = vmm(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in ["Exit status", "130", "--events", "crash"] {
            assert!(text.contains(needle), "{sub} --help lacks {needle:?}");
        }
    }
}

#[test]
fn ctrl_c_in_a_terminal_stops_clones_in_workers_without_killing_the_workers() {
    if !kvm() {
        return;
    }
    // A terminal's Ctrl-C signals the whole process group, the workers too: they must
    // leave it to the VMM, which stops their VMs and reports.
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "fork",
            "--mem",
            "16M",
            "--clones",
            "2",
            "--workers",
            "2",
            "--phase1",
            "fill:seed=1:pages=8",
            "--phase2",
            "random:count=1000000000:pages=8",
            "--json",
        ])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: signalling the process group of our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let vms = r["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 3, "{r}");
    for v in vms {
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("Ctrl-C") && !e.contains("worker process"),
            "every VM stopped by Ctrl-C, none lost with a worker: {v}"
        );
    }
}
