//! Why the program stopped, and the exit status each reason gives: 2 for bad input or a
//! host that cannot run the VMs, 1 for a guest that failed or ran out of time. Library
//! errors are kept as sources and classified by their variants, never by their text.

use std::time::Duration;

use guestmem::pool::PoolError;
use vmm::workload::WorkloadError;
use vmm::{ForkError, VcpuError, VmError};

/// Why the program stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Bad input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A workload that does not parse or does not fit the guest (exit 2).
    #[error("{}{source}", given.as_ref().map(|g| format!("{g}: ")).unwrap_or_default())]
    Workload {
        /// For parse errors, the option and text (`--workload "fil"`).
        given: Option<String>,
        /// Why.
        #[source]
        source: WorkloadError,
    },
    /// The host cannot run it: no KVM, limits (exit 2).
    #[error("{0}")]
    Host(String),
    /// KVM could not be set up (exit 2).
    #[error("cannot use KVM: {0}")]
    Kvm(#[source] VmError),
    /// The pool asked for (`what`: `--pool` or the default) has more frames than frame
    /// numbers can index (exit 2: ask for less).
    #[error("{what}: {source}")]
    PoolTooLarge {
        /// Which pool, and how to ask for a smaller one.
        what: String,
        /// [`PoolError::TooLarge`].
        #[source]
        source: PoolError,
    },
    /// The host could not make the pool (exit 2).
    #[error("cannot create a frame pool of {bytes} bytes: {source}")]
    Pool {
        /// Pool size asked for.
        bytes: u64,
        /// Why.
        #[source]
        source: PoolError,
    },
    /// The swap file could not be created (exit 2).
    #[error(transparent)]
    Swap(#[from] guestmem::reclaim::swap::SwapError),
    /// The manager already had a swap device (exit 1: a bug, the CLI attaches one).
    #[error("cannot attach the swap file: {0}")]
    AttachSwap(#[source] guestmem::space::AttachError),
    /// The background reclaimer's thread could not be started (exit 2: a host limit).
    #[error(
        "cannot start the reclaimer thread: {0}; raise the host's thread limit or run without \
         swap"
    )]
    Reclaimer(#[source] std::io::Error),
    /// Creating a VM failed (exit 2 on a host limit, else 1).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A snapshot-fork failed (exit 2 on a host limit, else 1).
    #[error(transparent)]
    Fork(#[from] ForkError),
    /// The worker processes could not be started or asked (`--workers`; exit 2 when they
    /// could not start or hit a host limit, else 1).
    #[error("{0}")]
    Worker(#[from] vmm::worker::WorkerError),
    /// A vCPU failed a step (exit 2 on a host limit, else 1).
    #[error("{vm}, {step}: {source}")]
    Guest {
        /// Which VM (and phase).
        vm: String,
        /// Which step.
        step: String,
        /// Why.
        #[source]
        source: VcpuError,
    },
    /// A vCPU had not finished its step when `--timeout` ran out (exit 1).
    #[error(
        "{vm}, vCPU {vcpu}: {step} had not finished when the --timeout of {} s ran out, so \
         the VMs were stopped: give a longer --timeout or a smaller workload",
        timeout.as_secs_f64()
    )]
    TimedOut {
        /// Which VM (and phase).
        vm: String,
        /// The late vCPU.
        vcpu: u32,
        /// Which step.
        step: String,
        /// The `--timeout` given.
        timeout: Duration,
    },
    /// Ctrl-C (or SIGTERM) stopped the guests' work (exit 130, as a shell reports SIGINT).
    #[error(
        "{vm}: {step} was stopped by Ctrl-C (the VMs were stopped; the report shows what had finished)"
    )]
    Interrupted {
        /// Which VM (and phase).
        vm: String,
        /// Which step.
        step: String,
    },
    /// Writing the report failed (exit 2; a closed pipe ends quietly instead).
    #[error("cannot write the report: {0}: free some space or write it elsewhere")]
    Report(#[source] std::io::Error),
    /// Something the program relies on did not hold (exit 1): a bug to report.
    #[error("internal error: {0} (please report it)")]
    Internal(String),
    /// A thread running a VM panicked (exit 1).
    #[error("a thread running {0} panicked")]
    Panicked(String),
}

impl CliError {
    /// The exit status.
    pub(crate) fn code(&self) -> u8 {
        let host_or_failed = |host: bool| if host { 2 } else { 1 };
        match self {
            CliError::Usage(_)
            | CliError::Workload { .. }
            | CliError::Host(_)
            | CliError::Kvm(_)
            | CliError::PoolTooLarge { .. }
            | CliError::Pool { .. }
            | CliError::Swap(_)
            | CliError::Reclaimer(_) => 2,
            CliError::Vm(e) => host_or_failed(e.is_host_limit()),
            CliError::Fork(e) => host_or_failed(e.is_host_limit()),
            CliError::Worker(e) => host_or_failed(
                matches!(
                    e,
                    vmm::worker::WorkerError::Spawn { .. } | vmm::worker::WorkerError::Start(_)
                ) || e.is_host_limit(),
            ),
            CliError::Guest { source, .. } => host_or_failed(source.is_host_limit()),
            CliError::TimedOut { .. }
            | CliError::Panicked(_)
            | CliError::Internal(_)
            | CliError::AttachSwap(_) => 1,
            CliError::Interrupted { .. } => 130,
            CliError::Report(_) => 2,
        }
    }

    /// `e` from `vm`'s `step`: a [`VcpuError::Timeout`] becomes [`CliError::TimedOut`].
    pub(crate) fn from_step(
        e: VcpuError,
        vm: &str,
        step: impl FnOnce() -> String,
        timeout: Option<Duration>,
    ) -> CliError {
        match (e, timeout) {
            (VcpuError::Timeout(_), _) if super::feedback::interrupted() => CliError::Interrupted {
                vm: vm.into(),
                step: step(),
            },
            (VcpuError::Timeout(vcpu), Some(timeout)) => CliError::TimedOut {
                vm: vm.into(),
                vcpu,
                step: step(),
                timeout,
            },
            (source, _) => CliError::Guest {
                vm: vm.into(),
                step: step(),
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_timeout_becomes_timed_out_naming_vm_vcpu_step_and_limit() {
        let e = CliError::from_step(
            VcpuError::Timeout(3),
            "VM 2",
            || "step 1 (random)".into(),
            Some(Duration::from_millis(1500)),
        );
        assert!(matches!(e, CliError::TimedOut { vcpu: 3, .. }), "{e:?}");
        assert_eq!(e.code(), 1);
        let text = e.to_string();
        for part in ["VM 2", "vCPU 3", "step 1 (random)", "--timeout of 1.5 s"] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
    }

    #[test]
    fn other_vcpu_errors_keep_their_type_and_a_guest_failure_exits_1() {
        let e = CliError::from_step(VcpuError::Dead(0), "VM 0", || "step 2 (fill)".into(), None);
        assert!(
            matches!(
                e,
                CliError::Guest {
                    source: VcpuError::Dead(0),
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.code(), 1);
    }

    #[test]
    fn a_pool_beyond_frame_numbers_is_a_usage_error() {
        let e = CliError::PoolTooLarge {
            what: "--pool 17T".into(),
            source: PoolError::TooLarge {
                frames: 17 << 28,
                nodes: 1,
                max_frames: u64::from(u32::MAX),
                max_nodes: 1 << 16,
            },
        };
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("16 TiB"), "{e}");
    }
}
