//! A fork into more clones than the open-file limit allows fails up front with a clear
//! error, and the parent runs on untouched. Runs in its own test binary: it lowers this
//! process's hard open-file limit, which cannot be raised again. Needs /dev/kvm (fails
//! saying so unless SKIP_KVM=1).

use vmm::{Command, ForkError, ForkOptions, Op, open_fds};

mod common;

#[test]
fn a_fork_past_the_open_file_limit_fails_cleanly() {
    let Some(hv) = common::hypervisor() else {
        return;
    };
    let (pool, _mm, parent) = common::filled_parent(&hv);
    let (gfn, pages, seed) = common::FILLED;
    let fds = open_fds().expect("count fds");
    // Room for a few clones, not for 50.
    let limit = libc::rlimit {
        rlim_cur: fds + 40,
        rlim_max: fds + 40,
    };
    // SAFETY: setrlimit reads one rlimit; lowering our own limits needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    match parent.fork(&hv, &ForkOptions::new(50)) {
        Err(e @ ForkError::FileLimit { .. }) => {
            assert!(e.to_string().contains("ulimit"), "{e}");
        }
        other => panic!("expected FileLimit, got {other:?}"),
    }
    assert_eq!(open_fds(), Some(fds), "no descriptor leaked");
    // A fork within the limit still works, and the parent verifies.
    let (clones, _) = parent.fork(&hv, &ForkOptions::new(2)).expect("fork 2");
    for vm in std::iter::once(&parent).chain(clones.iter()) {
        let r = vm
            .vm()
            .run(0, Command::new(Op::Verify, gfn, pages, seed))
            .expect("verify");
        assert_eq!(r.mismatches(), 0);
    }
    drop(clones);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}
