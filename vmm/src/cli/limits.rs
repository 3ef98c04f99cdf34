//! Checks on what the command line asks for, before anything is created: sizes and their
//! sums (every sum of user input is checked, so a huge value is an error, never a wrap),
//! counts, the CPU to pin to; and opening the host resources (KVM, the frame pool) with
//! errors that say what to do.

use std::sync::Arc;

use guestmem::pool::PoolError;
use guestmem::reclaim::ReclaimConfig;
use guestmem::reclaim::swap::{SwapConfig, SwapDevice};
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig};
use vmm::guest::MAX_RAM;
use vmm::{Command, Hypervisor};

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
/// The CPUs a VM whose home is pool node `home` runs on: its host node's, if the pool
/// node is bound to one.
pub(crate) fn home_cpus(
    mm: &guestmem::Manager,
    home: guestmem::NodeId,
) -> Option<std::sync::Arc<[usize]>> {
    mm.pool()
        .nodes()
        .get(usize::from(home.0))?
        .host_node()
        .and_then(vmm::numa::host_node_cpus)
}

/// `--vcpu-nodes`: at least one entry, each a node of the pool.
pub(crate) fn check_vcpu_nodes(list: &[u16], nodes: usize) -> Result<(), CliError> {
    if list.is_empty() {
        return Err(CliError::Usage(
            "--vcpu-nodes needs at least one node (like 0,1)".into(),
        ));
    }
    if let Some(&n) = list.iter().find(|&&n| usize::from(n) >= nodes) {
        return Err(CliError::Usage(format!(
            "--vcpu-nodes: node {n} does not exist with --nodes {nodes} (nodes are 0 to {}); \
             give --nodes {} or more",
            nodes - 1,
            n + 1
        )));
    }
    Ok(())
}

/// The vCPU homes of `--vcpu-nodes` (each with its host node's CPUs, if bound).
pub(crate) fn vcpu_homes(mm: &guestmem::Manager, list: &[u16]) -> std::sync::Arc<[vmm::VcpuHome]> {
    list.iter()
        .map(|&n| vmm::VcpuHome {
            node: guestmem::NodeId(n),
            cpus: home_cpus(mm, guestmem::NodeId(n)),
        })
        .collect()
}

/// `--nodes` and `--policy`: 1 to 64 nodes, and a policy naming one of them.
pub(crate) fn check_nodes(common: &Common) -> Result<(), CliError> {
    if !(1..=64).contains(&common.nodes) {
        return Err(CliError::Usage(format!(
            "--nodes {} must be between 1 and 64",
            common.nodes
        )));
    }
    if let Some(n) = common
        .policy
        .node()
        .filter(|n| usize::from(n.0) >= common.nodes)
    {
        return Err(CliError::Usage(format!(
            "--policy {}: node {} does not exist with --nodes {} (nodes are 0 to {})",
            common.policy,
            n.0,
            common.nodes,
            common.nodes - 1
        )));
    }
    Ok(())
}

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
    let given = match (&common.pool, &common.host_memory) {
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "--pool and --host-memory both size the frame pool: keep one (--host-memory \
                 also turns swap on)"
                    .into(),
            ));
        }
        (Some(s), None) => Some(("--pool", s)),
        (None, Some(s)) => Some(("--host-memory", s)),
        (None, None) => None,
    };
    let bytes = match given {
        Some((flag, s)) => {
            let b = parse_size(s).map_err(|e| CliError::Usage(format!("{flag}: {e}")))?;
            if b % PAGE != 0 || b == 0 {
                return Err(CliError::Usage(format!(
                    "{flag} {s} must be a non-zero multiple of 4 KiB"
                )));
            }
            b
        }
        // Each node can hold everything (the pool is sparse): a VM can move to any node.
        None => default_pool.saturating_mul(common.nodes.max(1) as u64),
    };
    if need > bytes && !common.swap_on() {
        return Err(CliError::Usage(format!(
            "the VMs need at least {} MiB but the frame pool has {} MiB: give a bigger --pool \
             or a smaller --mem, or let reclaim swap the rest (--swap, or --host-memory SIZE)",
            need.div_ceil(MIB),
            bytes / MIB
        )));
    }
    Ok(bytes)
}

/// Host bytes `plan` (one VM's commands) may make resident: every page any step covers
/// (reads of a hole may take a frame too), at most the guest's `mem`.
pub(crate) fn touched_bytes(plan: &[Vec<Command>], mem: u64) -> Result<u64, CliError> {
    let pages = plan
        .iter()
        .flatten()
        .try_fold(0u64, |sum, c| sum.checked_add(c.pages))
        .ok_or_else(|| {
            CliError::Usage("the workload covers more pages than 64 bits count".into())
        })?;
    Ok(pages.saturating_mul(PAGE).min(mem))
}

/// Memory this process may still use: the host's `MemAvailable` plus free swap, and no
/// more than its cgroup's `memory.max` leaves. `None` if the host does not say.
pub(crate) fn host_available() -> Option<HostMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let available = field("MemAvailable")?;
    let swap = field("SwapFree").unwrap_or(0);
    Some(HostMemory {
        available,
        swap,
        cgroup: cgroup_room(),
    })
}

/// What [`host_available`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostMemory {
    /// `MemAvailable`, bytes.
    pub available: u64,
    /// `SwapFree`, bytes.
    pub swap: u64,
    /// Room left under this process's cgroup v2 `memory.max`, bytes (none: no limit).
    pub cgroup: Option<u64>,
}

impl HostMemory {
    /// Bytes the VMs may make resident.
    pub(crate) fn room(&self) -> u64 {
        let host = self.available.saturating_add(self.swap);
        self.cgroup.map_or(host, |c| c.min(host))
    }
}

/// `memory.max - memory.current` of this process's cgroup (v2), if it has a limit.
fn cgroup_room() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses VMs that will make more than the host can hold resident (`need` bytes): they
/// would run into the host's OOM killer.
pub(crate) fn check_host_memory(need: u64) -> Result<(), CliError> {
    let Some(host) = host_available() else {
        return Ok(());
    };
    if need <= host.room() {
        return Ok(());
    }
    Err(CliError::Host(format!(
        "the VMs' workloads touch up to {} MiB of guest memory, but this host has {} MiB \
         available (MemAvailable {} MiB + free swap {} MiB{}): use a smaller --mem, fewer VMs \
         or clones, or a workload that touches less",
        need.div_ceil(MIB),
        host.room() / MIB,
        host.available / MIB,
        host.swap / MIB,
        host.cgroup
            .map(|c| format!(", at most {} MiB under this cgroup's memory.max", c / MIB))
            .unwrap_or_default()
    )))
}

/// Descriptors one VM holds: KVM VM, userfaultfd, two eventfd handles, a vCPU each.
fn fds_per_vm(vcpus: u32) -> u64 {
    4 + u64::from(vcpus)
}

/// Refuses to make `vms` more VMs of `vcpus` vCPUs when the open-file limit (the soft
/// limit raised to the hard one first) cannot take their descriptors.
pub(crate) fn check_fds(vms: usize, vcpus: u32) -> Result<(), CliError> {
    let limit = vmm::raise_nofile_limit();
    let open = vmm::open_fds().unwrap_or(0);
    let need = (vms as u64).saturating_mul(fds_per_vm(vcpus));
    // Room for the process's own files (the pool's memfd, the report, libraries).
    const SPARE: u64 = 16;
    if open.saturating_add(need).saturating_add(SPARE) > limit {
        return Err(CliError::Host(format!(
            "{vms} VM(s) of {vcpus} vCPU(s) need about {need} file descriptors ({} each) and \
             {open} are open, but the open-file limit is {limit} (with {SPARE} kept spare): \
             raise it (ulimit -n, or LimitNOFILE) or run fewer VMs or clones",
            fds_per_vm(vcpus)
        )));
    }
    Ok(())
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
/// With swap on (`--swap`, `--host-memory`), a swap file big enough for the `need` bytes
/// the VMs can touch is attached and the background reclaimer started.
pub(crate) fn manager(common: &Common, bytes: u64, need: u64) -> Result<Arc<Manager>, CliError> {
    let allocator = match common.allocator {
        AllocatorArg::Magazine => AllocatorKind::Magazine,
        AllocatorArg::Percpu => AllocatorKind::PerCpuLists,
        AllocatorArg::Global => AllocatorKind::GlobalLock,
    };
    let mut pcfg = PoolConfig::uniform(bytes, common.nodes, allocator);
    // Where the host has as many NUMA nodes with memory, pool node i is bound to host node
    // i (and its VMs' threads run on that node's CPUs); otherwise the nodes are pools in
    // whatever memory the host gives.
    if vmm::numa::host_memory_nodes().is_some_and(|h| h >= common.nodes) {
        for (k, n) in pcfg.nodes.iter_mut().enumerate() {
            n.host_node = Some(k as u32);
        }
    }
    let pool = Pool::new(&pcfg).map_err(|e| match e {
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
    let mm = Manager::new(Arc::new(pool), cfg);
    if common.swap_on() {
        let frames = mm.pool().total_frames();
        // Room for everything the VMs can touch beyond the pool, plus a tenth.
        let slots = (need / PAGE).saturating_sub(frames) + need / PAGE / 10 + 1024;
        let path = common
            .swap
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
        let dev = SwapDevice::create(&SwapConfig {
            path,
            slots,
            ..Default::default()
        })
        .map_err(CliError::Swap)?;
        mm.attach_swap(dev, ReclaimConfig::for_pool(frames))
            .map_err(CliError::AttachSwap)?;
        mm.start_reclaimer().map_err(CliError::Reclaimer)?;
    }
    Ok(mm)
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
    fn the_host_memory_check_refuses_what_cannot_fit_and_passes_what_can() {
        let Some(host) = host_available() else { return };
        assert!(check_host_memory(MIB).is_ok());
        let too_much = host.room() + 64 * MIB;
        let e = check_host_memory(too_much).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("MemAvailable"), "{e}");
    }

    #[test]
    fn the_descriptor_check_gives_real_numbers() {
        assert!(check_fds(1, 1).is_ok());
        let e = check_fds(1 << 40, 2).unwrap_err().to_string();
        assert!(
            e.contains(&format!("need about {} file", (1u64 << 40) * 6)),
            "{e}"
        );
        assert!(!e.starts_with("0 "), "{e}");
    }

    #[test]
    fn a_cpu_this_process_cannot_run_on_is_refused() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(check_cpu(None).is_ok());
        assert!(check_cpu(Some(0)).is_ok());
        assert!(matches!(check_cpu(Some(cpus)), Err(CliError::Usage(_))));
    }
}
