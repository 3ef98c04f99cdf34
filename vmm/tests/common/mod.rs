//! What the `vmm` binary's integration tests share: running the binary, expecting a
//! refusal, and the `/dev/kvm` rule (fail saying it is missing unless SKIP_KVM=1).

// Each test file uses its own subset.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the `vmm` binary with `args` and collects its output.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run the vmm binary")
}

/// Runs `args`, expects exit status 2 and a message containing `needle` (any case), and
/// no panic.
pub fn rejects(args: &[&str], needle: &str) {
    let out = vmm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: {err:?} should mention {needle:?}"
    );
}

/// Runs `args` (which end in `--json`), expects exit status `code` and no panic, and
/// returns the JSON report.
pub fn report(args: &[&str], code: i32) -> serde_json::Value {
    let out = vmm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: no JSON ({e})"))
}

/// Whether KVM tests run: true with `/dev/kvm`; without it false under SKIP_KVM=1, else
/// a failure saying so.
pub fn kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("skipping: /dev/kvm is missing and SKIP_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing: these tests need KVM (set SKIP_KVM=1 to skip them)");
}
