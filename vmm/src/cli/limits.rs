//! Checks on what the command line asks for, before anything is created: sizes and their
//! sums (every sum of user input is checked, so a huge value is an error, never a wrap),
//! counts, the CPU to pin to; and opening the host resources (KVM, the frame pool) with
//! errors that say what to do.

use std::sync::Arc;

use guestmem::pool::PoolError;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::Hypervisor;
use vmm::guest::MAX_RAM;

use super::args::{AllocatorArg, Common, RmapArg};
use super::error::CliError;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const PAGE: u64 = 4096;

/// Free frames the default pool holds beyond what the VMs can write.
const POOL_SLACK: u64 = 16 * MIB;

/// Parses `4096`, `64K`, `256M`, `1G`, `2T`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional K/M/G/T unit"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("size {s:?} must be non-zero and fit in 64 bits"))
}

/// Guest RAM from `--mem`, checked.
pub(crate) fn guest_mem(s: &str) -> Result<u64, CliError> {
    let mem = parse_size(s).map_err(|e| CliError::Usage(format!("--mem: {e}")))?;
    if mem % (2 * MIB) != 0 || !(4 * MIB..=MAX_RAM).contains(&mem) {
        return Err(CliError::Usage(format!(
            "--mem {s} must be a multiple of 2 MiB between 4 MiB and {} GiB",
            MAX_RAM >> 30
        )));
    }
    Ok(mem)
}

/// `--vcpus`, checked.
pub(crate) fn check_vcpus(vcpus: u32) -> Result<(), CliError> {
    if vcpus == 0 || vcpus > 64 {
        return Err(CliError::Usage("--vcpus must be between 1 and 64".into()));
    }
    Ok(())
}

/// `--cpu`: one of the CPUs this process may run on (pinning to any other would silently
/// leave the threads unpinned).
pub(crate) fn check_cpu(cpu: Option<usize>) -> Result<(), CliError> {
    let Some(cpu) = cpu else { return Ok(()) };
    // available_parallelism counts the CPUs in this process's affinity mask (and cgroup
    // quota). If the host cannot say, the pin is left to try.
    let Ok(cpus) = std::thread::available_parallelism() else {
        return Ok(());
    };
    let cpus = cpus.get();
    if cpu >= cpus {
        return Err(CliError::Usage(format!(
            "--cpu {cpu}: this process can run on {cpus} CPU(s), numbered 0 to {}: pick one of \
             them, or leave --cpu out to run unpinned",
            cpus - 1
        )));
    }
    Ok(())
}

/// Guest RAM of `vms` VMs of `mem` bytes each, checked.
pub(crate) fn run_need(mem: u64, vms: u32) -> Result<u64, CliError> {
    mem.checked_mul(u64::from(vms)).ok_or_else(|| {
        CliError::Usage(format!(
            "{vms} VMs of {mem} bytes each is more memory than 64 bits count: use a smaller \
             --mem or fewer --vms"
        ))
    })
}

/// A fork's memory: the parent's `mem` bytes plus `copies` VMs writing `per_copy` pages
/// each, checked.
pub(crate) fn fork_need(mem: u64, copies: u64, per_copy: u64) -> Result<u64, CliError> {
    copies
        .checked_mul(per_copy)
        .and_then(|p| p.checked_mul(PAGE))
        .and_then(|b| b.checked_add(mem))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{copies} clones writing {per_copy} pages each is more memory than 64 bits \
                 count: fork fewer --clones or write less in --phase2"
            ))
        })
}

/// The default pool for VMs that need `need` bytes: that plus some slack, checked.
pub(crate) fn default_pool(need: u64) -> Result<u64, CliError> {
    need.checked_add(POOL_SLACK).ok_or_else(|| {
        CliError::Usage(format!(
            "the VMs need {need} bytes, more than 64 bits count: use a smaller --mem or fewer VMs"
        ))
    })
}

/// The frame pool's size: `--pool` or `default_pool`, checked against `need`.
pub(crate) fn pool_bytes(common: &Common, default_pool: u64, need: u64) -> Result<u64, CliError> {
    let bytes = match &common.pool {
        Some(s) => {
            let b = parse_size(s).map_err(|e| CliError::Usage(format!("--pool: {e}")))?;
            if b % PAGE != 0 {
                return Err(CliError::Usage(format!(
                    "--pool {s} must be a multiple of 4 KiB"
                )));
            }
            b
        }
        None => default_pool,
    };
    if need > bytes {
        return Err(CliError::Usage(format!(
            "the VMs need at least {} MiB but the frame pool has {} MiB: give a bigger --pool \
             or a smaller --mem",
            need.div_ceil(MIB),
            bytes / MIB
        )));
    }
    Ok(bytes)
}

/// Opens `/dev/kvm`, or says why not and what to do.
pub(crate) fn hypervisor() -> Result<Hypervisor, CliError> {
    let path = std::path::Path::new("/dev/kvm");
    if !path.exists() {
        return Err(CliError::Host(
            "/dev/kvm does not exist: this host has no KVM. Load the module (modprobe kvm_intel \
             or kvm_amd) or run on a machine or VM with virtualization enabled"
                .into(),
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        return Err(CliError::Host(
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                "no permission to open /dev/kvm: add this user to the kvm group \
             (sudo usermod -aG kvm $USER, then log in again) or run as root"
                    .into()
            } else {
                format!("cannot open /dev/kvm: {e}")
            },
        ));
    }
    Hypervisor::new().map_err(CliError::Kvm)
}

/// The pool of `bytes` and the manager the VMs run on.
pub(crate) fn manager(common: &Common, bytes: u64) -> Result<Arc<Manager>, CliError> {
    let allocator = match common.allocator {
        AllocatorArg::Magazine => AllocatorKind::Magazine,
        AllocatorArg::Percpu => AllocatorKind::PerCpuLists,
        AllocatorArg::Global => AllocatorKind::GlobalLock,
    };
    let pool = Pool::new(&PoolConfig::uniform(bytes, 1, allocator)).map_err(|e| match e {
        PoolError::TooLarge { .. } => CliError::PoolTooLarge {
            what: match &common.pool {
                Some(s) => format!("--pool {s} is too large"),
                None => format!(
                    "the VMs need a frame pool of {} MiB, too large (use a smaller --mem or \
                     fewer VMs or clones)",
                    bytes / MIB
                ),
            },
            source: e,
        },
        e => CliError::Pool { bytes, source: e },
    })?;
    let mut cfg = ManagerConfig::default();
    cfg.rmap.design = match common.rmap {
        RmapArg::Chain => rmap::Design::Chain,
        RmapArg::Flat => rmap::Design::Flat,
    };
    Ok(Manager::new(Arc::new(pool), cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("17T"), Ok(17 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_size("16777216T").is_err());
    }

    #[test]
    fn memory_sums_that_overflow_are_usage_errors_not_wraps() {
        assert!(matches!(run_need(u64::MAX / 2, 3), Err(CliError::Usage(_))));
        assert!(matches!(
            fork_need(64 << 30, 10_001, u64::MAX / PAGE / 10_000),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(fork_need(u64::MAX, 1, 1), Err(CliError::Usage(_))));
        assert!(matches!(
            default_pool(u64::MAX - 1),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn memory_sums_that_fit_are_exact() {
        assert_eq!(run_need(64 << 30, 1000).ok(), Some(64_000 << 30));
        assert_eq!(
            fork_need(1 << 30, 8, 256).ok(),
            Some((1 << 30) + 8 * 256 * PAGE)
        );
        assert_eq!(default_pool(MIB).ok(), Some(17 * MIB));
    }

    #[test]
    fn a_cpu_this_process_cannot_run_on_is_refused() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(check_cpu(None).is_ok());
        assert!(check_cpu(Some(0)).is_ok());
        assert!(matches!(check_cpu(Some(cpus)), Err(CliError::Usage(_))));
    }
}
