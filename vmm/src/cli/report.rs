//! What `run` and `fork` report, as JSON (serde) or as text, and writing it: a report that
//! cannot be written is an error ([`CliError::Report`]), except a closed pipe (`| head`),
//! which ends quietly as Unix tools do.

use std::io::{self, Write};

use guestmem::reclaim::ReclaimStats;
use guestmem::reclaim::swap::SwapStats;
use guestmem::space::CounterSnapshot;
use guestmem::{Manager, MemoryUsage};
use vmm::{FaultCounts, Op};

use super::args::{AllocatorArg, Common, RmapArg};
use super::error::CliError;
use super::limits::{MIB, PAGE};
use super::steps::StepReport;

/// Everything the run was asked to do, as given (JSON only).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Config {
    pub command: &'static str,
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// `vmm run`: VMs.
    pub vms: Option<u32>,
    /// `vmm fork`/`demo`: clones.
    pub clones: Option<usize>,
    pub grandchild: bool,
    pub shells: bool,
    /// `fork --workers`: worker processes holding the clones (0: none, all in this one).
    pub workers: usize,
    /// `fork`: what the fork did with the parent's window (`rebirth`, `in-place`).
    pub parent: Option<&'static str>,
    pub pool_bytes: u64,
    /// `--pool` as given (none: the default).
    pub pool: Option<String>,
    /// The swap file, with swap on (`--swap`, `--host-memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_path: Option<String>,
    /// `--host-memory`, bytes (the frame pool's size), if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_memory_bytes: Option<u64>,
    pub allocator: &'static str,
    pub rmap: &'static str,
    pub cpu: Option<usize>,
    pub timeout_s: Option<f64>,
    /// The workloads as typed: `workload` for run, `phase1`/`phase2` for fork.
    pub workload: Option<String>,
    pub phase1: Option<String>,
    pub phase2: Option<String>,
    /// Memory nodes of the pool (`--nodes`), each its own memfd; on this host all in the
    /// same memory unless the nodes were bound to host NUMA nodes.
    pub nodes: usize,
    /// `--policy`.
    pub policy: String,
    /// The host's NUMA nodes with memory.
    pub host_numa_nodes: Option<usize>,
    /// Pool node i is bound to host NUMA node i (the host has enough nodes), and each
    /// VM's threads run on its home node's CPUs.
    pub nodes_bound: bool,
    /// `run --vcpu-nodes`: each vCPU's home node (vCPU i the (i mod len)-th).
    pub vcpu_nodes: Option<Vec<u16>>,
}

impl Config {
    /// The configuration of `command` from the shared options; the rest is filled in by
    /// the command. `mm` gives the swap file's path, if it has one.
    pub(crate) fn new(
        command: &'static str,
        c: &Common,
        mem: u64,
        pool_bytes: u64,
        mm: &Manager,
    ) -> Config {
        Config {
            command,
            mem_bytes: mem,
            vcpus: c.vcpus,
            vms: None,
            clones: None,
            grandchild: false,
            shells: false,
            workers: 0,
            parent: None,
            pool_bytes,
            pool: c.pool.clone(),
            swap_path: mm.swap_device().map(|d| d.path().display().to_string()),
            // --host-memory sizes the pool (it and --pool exclude each other).
            host_memory_bytes: c.host_memory.as_ref().map(|_| pool_bytes),
            allocator: match c.allocator {
                AllocatorArg::Magazine => "magazine",
                AllocatorArg::Percpu => "percpu",
                AllocatorArg::Global => "global",
            },
            rmap: match c.rmap {
                RmapArg::Chain => "chain",
                RmapArg::Flat => "flat",
            },
            cpu: c.cpu,
            timeout_s: c.timeout.map(|t| t.as_secs_f64()),
            workload: None,
            phase1: None,
            phase2: None,
            nodes: c.nodes,
            policy: c.policy.to_string(),
            host_numa_nodes: vmm::numa::host_memory_nodes(),
            nodes_bound: mm.pool().nodes().iter().all(|n| n.host_node().is_some()),
            vcpu_nodes: None,
        }
    }
}

/// Memory in MiB, for reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct MemMib {
    pub resident: f64,
    pub shared: f64,
    pub private: f64,
    pub pss: f64,
}

impl From<MemoryUsage> for MemMib {
    fn from(m: MemoryUsage) -> MemMib {
        let mib = |p: f64| p * PAGE as f64 / MIB as f64;
        MemMib {
            resident: mib(m.resident as f64),
            shared: mib(m.shared as f64),
            private: mib(m.private as f64),
            pss: mib(m.pss),
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct VmRunReport {
    pub vm: u32,
    pub steps: Vec<StepReport>,
    pub faults: FaultCounts,
    pub counters: CounterSnapshot,
    pub memory_pages: MemoryUsage,
    pub memory_mib: MemMib,
    pub window_host_mappings: Option<u64>,
    /// Resident pages on each node of the pool at the end.
    pub pages_per_node: Vec<u64>,
    /// Bad words the workload's verify steps found.
    pub mismatches: u64,
    /// Why this VM stopped early, if it did.
    pub error: Option<String>,
    /// Every step ran and no verify found a bad word.
    pub verified: bool,
}

/// What reclaim and the swap file did in a run with swap on.
#[derive(Debug, serde::Serialize)]
pub(crate) struct SwapSummary {
    pub path: String,
    /// What the workloads can touch, bytes (the VMs' share of guest memory they write or
    /// read, shared pages once).
    pub touched_bytes: u64,
    /// The frame pool (the resident budget), bytes.
    pub pool_bytes: u64,
    pub device: SwapStats,
    pub reclaim: ReclaimStats,
    /// Why swap-out stopped (a full disk), if it did.
    pub stopped: Option<String>,
}

impl SwapSummary {
    /// The summary of `mm`'s swap, if it has one, for workloads that can touch
    /// `touched_bytes`.
    pub(crate) fn of(mm: &Manager, touched_bytes: u64) -> Option<SwapSummary> {
        let dev = mm.swap_device()?;
        Some(SwapSummary {
            path: dev.path().display().to_string(),
            touched_bytes,
            pool_bytes: mm.pool().total_frames() * PAGE,
            device: dev.stats(),
            reclaim: mm.reclaim_stats(),
            stopped: dev.stop_reason(),
        })
    }
}

/// The swap summary as text lines.
fn print_swap(out: &mut dyn Write, s: &SwapSummary) -> io::Result<()> {
    let r = &s.reclaim;
    let (touched, pool) = (s.touched_bytes as f64, s.pool_bytes as f64);
    writeln!(
        out,
        "{}: the workloads can touch {:.1} MiB and the frame pool holds {:.1} MiB ({:.2}x)",
        if touched > pool {
            "overcommit"
        } else {
            "no overcommit"
        },
        touched / MIB as f64,
        pool / MIB as f64,
        touched / pool.max(1.0)
    )?;
    writeln!(
        out,
        "swap ({}): {:.1} MiB written, {:.1} MiB read; {} pages reclaimed ({} written, {} \
         same-filled markers, {} clean without I/O), {} swapped back in ({} read from the \
         file); {} slots in use, {} bad; kswapd ran {} times, direct reclaim {} times",
        s.path,
        s.device.bytes_written as f64 / MIB as f64,
        s.device.bytes_read as f64 / MIB as f64,
        r.reclaimed,
        r.written,
        r.filled,
        r.clean_dropped,
        r.swapins,
        r.major_faults,
        s.device.used,
        s.device.bad,
        r.background_runs,
        r.direct_runs
    )?;
    if let Some(why) = &s.stopped {
        writeln!(out, "{why}")?;
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct RunReport {
    pub config: Config,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub vms: Vec<VmRunReport>,
    pub pool_bytes: u64,
    pub host_resident_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapSummary>,
    /// With `--migrate-to`: what moving the VMs' memory did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSummary>,
    /// With `--numa-balance`: what the balancer did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa_balance: Option<guestmem::BalanceStats>,
    pub frames_returned_at_exit: bool,
    /// Why the run stopped before every VM finished, if it did.
    pub error: Option<String>,
    pub verified: bool,
}

/// What `vmm run --migrate-to` did.
#[derive(Debug, serde::Serialize)]
pub(crate) struct MigrationSummary {
    pub to_node: u16,
    pub walk: guestmem::MigrateWalk,
    /// Passes over every VM's memory (the last after the workload ended).
    pub passes: u64,
    pub stats: guestmem::MigrateStats,
    /// Time spent moving, seconds (rate-limit sleeps excluded).
    pub seconds: f64,
    /// Bytes moved per second of that time, GB/s.
    pub gb_per_sec: f64,
}

/// One step as a text line.
fn print_step(out: &mut dyn Write, indent: &str, s: &StepReport) -> io::Result<()> {
    let what = match s.op {
        Op::Verify if s.mismatches == 0 => "ok".to_string(),
        Op::Verify => format!("{} BAD WORDS", s.mismatches),
        Op::Fill | Op::Dirty | Op::Crash => String::new(),
        _ => format!("result {:#x}", s.result),
    };
    writeln!(
        out,
        "{indent}{:<9} {:>8} pages {:>9.1} ms  {what}",
        vmm::workload::op_name(s.op),
        s.pages,
        s.ms
    )
}

/// Pages per node as "node 0 1.5 MiB, node 1 250.0 MiB".
fn by_node(pages: &[u64]) -> String {
    let per: Vec<String> = pages
        .iter()
        .enumerate()
        .map(|(n, p)| format!("node {n} {:.1} MiB", *p as f64 * PAGE as f64 / MIB as f64))
        .collect();
    per.join(", ")
}

/// With several pool nodes: a line saying what they are on this host.
fn print_nodes(out: &mut dyn Write, nodes: usize, policy: &str) -> io::Result<()> {
    if nodes < 2 {
        return Ok(());
    }
    let what = match vmm::numa::host_memory_nodes() {
        Some(h) if h >= nodes => format!(
            "bound to host NUMA nodes 0 to {}; each VM's threads run on its node's CPUs",
            nodes - 1
        ),
        Some(1) => "separate pools in the same memory: this host has one NUMA node".to_string(),
        Some(h) => format!("separate pools, not bound to the host's {h} NUMA nodes"),
        None => "separate pools (the host does not report its NUMA nodes)".to_string(),
    };
    writeln!(out, "{nodes} memory nodes ({what}); policy {policy}")
}

pub(crate) fn print_run(out: &mut dyn Write, r: &RunReport) -> io::Result<()> {
    writeln!(
        out,
        "{} VM(s) of {} MiB, {} vCPU(s) each, on a {} MiB frame pool",
        r.vms.len(),
        r.mem_bytes / MIB,
        r.vcpus,
        r.pool_bytes / MIB
    )?;
    print_nodes(out, r.config.nodes, &r.config.policy)?;
    if let Some(list) = &r.config.vcpu_nodes {
        let list: Vec<String> = list.iter().map(u16::to_string).collect();
        let hints: u64 = r.vms.iter().map(|v| v.faults.hint).sum();
        writeln!(
            out,
            "vCPU i on node entry i mod {} of [{}]: faults placed on the faulting vCPU's \
             node; {hints} hinting faults named the touching vCPU",
            list.len(),
            list.join(",")
        )?;
    }
    for v in &r.vms {
        writeln!(out, "VM {}:", v.vm)?;
        for s in &v.steps {
            print_step(out, "  ", s)?;
        }
        if let Some(e) = &v.error {
            writeln!(out, "  STOPPED: {e}")?;
        }
        let f = &v.faults;
        writeln!(
            out,
            "  faults: {} missing-read, {} missing-write, {} write-protect; zero-filled {} pages, \
             {} COW copies, {} COW reuses",
            f.missing_read,
            f.missing_write,
            f.write_protect,
            v.counters.zero_fill_pages,
            v.counters.cow_copies,
            v.counters.cow_reuses
        )?;
        let m = &v.memory_mib;
        writeln!(
            out,
            "  memory: resident {:.1} MiB, shared {:.1}, private {:.1}, PSS {:.1}; {} host mappings; verify {}",
            m.resident,
            m.shared,
            m.private,
            m.pss,
            v.window_host_mappings.unwrap_or(0),
            verdict(v.verified, v.error.is_some(), v.mismatches)
        )?;
        if r.swap.is_some() {
            writeln!(
                out,
                "  swap: {:.1} MiB swapped out now, {} pages swapped back in ({} major faults)",
                v.memory_pages.swapped as f64 * PAGE as f64 / MIB as f64,
                v.counters.swapins,
                v.counters.major_faults
            )?;
        }
    }
    if r.config.nodes > 1 {
        for v in &r.vms {
            writeln!(
                out,
                "VM {} memory by node: {}",
                v.vm,
                by_node(&v.pages_per_node)
            )?;
        }
    }
    if let Some(m) = &r.migration {
        writeln!(
            out,
            "migration to node {} ({:?} walks): {} passes moved {} pages ({:.1} MiB) in {} runs with {} host unmaps, {:.3} s of moving ({:.2} GB/s); left where they were: {} busy, {} for want of room, {} failed",
            m.to_node,
            m.walk,
            m.passes,
            m.stats.pages,
            m.stats.pages as f64 * PAGE as f64 / MIB as f64,
            m.stats.runs,
            m.stats.host_unmaps,
            m.seconds,
            m.gb_per_sec,
            m.stats.busy,
            m.stats.no_memory,
            m.stats.failed
        )?;
    }
    if let Some(b) = &r.numa_balance {
        writeln!(
            out,
            "NUMA balancing: {} scans, {} hinting faults ({} from another node), {} pages moved home, {} left (busy, full, or over the per-scan limit)",
            b.scans, b.hinting_faults, b.remote, b.pages_migrated, b.failed
        )?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "the run stopped early: {e}")?;
    }
    if let Some(s) = &r.swap {
        print_swap(out, s)?;
    }
    writeln!(
        out,
        "host memory used by guest frames: {:.1} MiB; every frame returned at exit: {}; all verifies {}",
        r.host_resident_bytes.unwrap_or(0) as f64 / MIB as f64,
        if r.frames_returned_at_exit {
            "yes"
        } else {
            "NO"
        },
        if r.verified { "passed" } else { "FAILED" }
    )
}

/// A VM's verdict in words.
fn verdict(verified: bool, stopped: bool, mismatches: u64) -> String {
    match (verified, stopped) {
        (true, _) => "passed".into(),
        (false, true) => "NOT DONE (stopped)".into(),
        (false, false) => format!("FAILED ({mismatches} bad words)"),
    }
}

/// One VM of a fork experiment in the report.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ForkVmReport {
    pub role: String,
    pub memory_pages: MemoryUsage,
    pub memory_mib: MemMib,
    pub cow_copies: u64,
    pub cow_reuses: u64,
    pub faults: FaultCounts,
    /// Creating this clone (address-space fork, VM, vCPUs, state), ms.
    pub fork_ms: Option<f64>,
    /// Every workload step this VM ran (phase 1 only in the parent).
    pub steps: Vec<StepReport>,
    /// Bad words the workload's own verify steps found.
    pub step_mismatches: u64,
    /// Whether the final verify ran (not when the VM or the experiment stopped first).
    pub final_verify_ran: bool,
    /// Pages the final verify (of everything this VM wrote or inherited) checked.
    pub pages_verified: u64,
    /// Bad words the final verify found.
    pub final_mismatches: u64,
    /// `step_mismatches + final_mismatches`.
    pub mismatches: u64,
    /// Why this VM stopped early, if it did (its final verify did not run).
    pub error: Option<String>,
    /// Every step and the final verify ran, and none found a bad word.
    pub verified: bool,
    /// With swap on: what of this VM is swapped out and what came back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<VmSwap>,
}

/// One VM's swap figures (a fork with swap on).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct VmSwap {
    /// Pages swapped out at the end.
    pub swapped_pages: u64,
    /// The same, MiB.
    pub swapped_mib: f64,
    /// Pages faulted back in from swap or the swap cache (refaults).
    pub swapins: u64,
    /// Swap-ins that read the swap file.
    pub major_faults: u64,
}

impl VmSwap {
    /// The figures of a VM with `memory` and `counters`.
    pub(crate) fn of(memory: &MemoryUsage, counters: &CounterSnapshot) -> VmSwap {
        VmSwap {
            swapped_pages: memory.swapped,
            swapped_mib: memory.swapped as f64 * PAGE as f64 / MIB as f64,
            swapins: counters.swapins,
            major_faults: counters.major_faults,
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct ForkReport {
    pub config: Config,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub clones: usize,
    pub vms: Vec<ForkVmReport>,
    /// Pause to the last clone running, ms.
    pub fork_total_ms: f64,
    /// Pausing the parent (vCPUs parked, queued faults drained), ms.
    pub fork_pause_ms: f64,
    /// Saving the parent's vCPU state, ms.
    pub fork_save_ms: f64,
    /// Moving the parent into a fresh VM and window, ms.
    pub fork_rebirth_ms: f64,
    /// Mean per clone, ms.
    pub fork_per_clone_ms: f64,
    /// The grandchild's fork (clone 1 forked once), ms.
    pub grandchild_fork_ms: Option<f64>,
    /// With `--shells`: making one clone's VM shell before the fork, ms (mean).
    pub shell_ms_per_clone: Option<f64>,
    /// Clones of the first fork whose VM came from a shell.
    pub clones_from_shells: usize,
    /// Host memory the pool's frames hold, MiB.
    pub host_mib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapSummary>,
    /// What every VM holding its own full copy of the parent's memory would take, MiB.
    pub full_copies_mib: f64,
    /// Sum of the VMs' PSS, MiB (equals the frames in use).
    pub pss_total_mib: f64,
    /// The demo's live move of one VM's memory to another node during phase 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_move: Option<super::fork::LiveMove>,
    pub frames_returned_at_exit: bool,
    /// Why the experiment stopped before every VM finished, if it did.
    pub error: Option<String>,
    pub verified: bool,
    pub elapsed_s: f64,
}

pub(crate) fn print_fork(out: &mut dyn Write, r: &ForkReport) -> io::Result<()> {
    writeln!(
        out,
        "snapshot-fork of a {} MiB, {}-vCPU guest into {} clones{}",
        r.mem_bytes / MIB,
        r.vcpus,
        r.clones,
        if r.grandchild_fork_ms.is_some() {
            " (and a clone of clone 1)"
        } else {
            ""
        }
    )?;
    print_nodes(out, r.config.nodes, &r.config.policy)?;
    writeln!(out)?;
    // With swap on, three columns before the verdict: swapped out, refaults, major faults.
    let swap_on = r.swap.is_some();
    let head = |out: &mut dyn Write, c: [&str; 9], s: [&str; 3]| {
        let mut line = format!(
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        );
        if swap_on {
            line.push_str(&format!(" {:>9} {:>9} {:>8}", s[0], s[1], s[2]));
        }
        line.push_str(&format!(" {:>9}", c[8]));
        writeln!(out, "{}", line.trim_end())
    };
    head(
        out,
        [
            "VM", "resident", "shared", "private", "PSS", "COW", "faults", "fork ms", "verify",
        ],
        ["swapped", "refaults", "major"],
    )?;
    head(
        out,
        ["", "MiB", "MiB", "MiB", "MiB", "copies", "", "", ""],
        ["MiB", "", "faults"],
    )?;
    for v in &r.vms {
        let m = &v.memory_mib;
        let swap = match (swap_on, &v.swap) {
            (true, Some(s)) => format!(
                " {:>9.1} {:>9} {:>8}",
                s.swapped_mib, s.swapins, s.major_faults
            ),
            (true, None) => format!(" {:>9} {:>9} {:>8}", "-", "-", "-"),
            (false, _) => String::new(),
        };
        writeln!(
            out,
            "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>8} {:>8} {:>9}{swap} {:>9}",
            v.role,
            m.resident,
            m.shared,
            m.private,
            m.pss,
            v.cow_copies,
            v.faults.total(),
            v.fork_ms.map_or("-".into(), |t| format!("{t:.2}")),
            match (v.verified, &v.error, v.final_verify_ran) {
                (true, _, _) => "ok",
                (false, Some(_), _) => "STOPPED",
                (false, None, false) => "NOT DONE",
                (false, None, true) => "FAILED",
            }
        )?;
    }
    // What went wrong, VM by VM, in the table's names.
    for v in r.vms.iter().filter(|v| !v.verified) {
        for s in v.steps.iter().filter(|s| s.mismatches > 0) {
            writeln!(
                out,
                "{}: phase {} {} found {} bad words",
                v.role,
                s.phase,
                vmm::workload::op_name(s.op),
                s.mismatches
            )?;
        }
        if v.final_mismatches > 0 {
            writeln!(
                out,
                "{}: the final verify found {} bad words in {} pages",
                v.role, v.final_mismatches, v.pages_verified
            )?;
        }
        if let Some(e) = &v.error {
            writeln!(out, "{}: stopped: {e}", v.role)?;
        }
    }
    writeln!(out)?;
    if let Some(m) = &r.live_move {
        writeln!(
            out,
            "live move: {}'s memory to node {} while phase 2 ran: {} pages ({:.1} MiB; frames it shares moved once for every VM) in {} runs, {} host unmaps, {:.2} s; now {}",
            m.vm,
            m.to_node,
            m.stats.pages,
            m.stats.pages as f64 * PAGE as f64 / MIB as f64,
            m.stats.runs,
            m.stats.host_unmaps,
            m.seconds,
            by_node(&m.pages_per_node)
        )?;
    }
    if r.fork_total_ms > 0.0 {
        writeln!(
            out,
            "fork: {:.2} ms from pause to {} clones running ({:.2} ms per clone; pause {:.3} ms, \
             save {:.3} ms, parent to a fresh VM {:.2} ms)",
            r.fork_total_ms,
            r.clones,
            r.fork_per_clone_ms,
            r.fork_pause_ms,
            r.fork_save_ms,
            r.fork_rebirth_ms
        )?;
    }
    if let Some(s) = r.shell_ms_per_clone {
        if r.config.workers > 0 {
            writeln!(
                out,
                "      the clones run in {} worker processes; their VMs were made there before the pause ({s:.2} ms each)",
                r.config.workers
            )?;
        } else if r.clones_from_shells == r.clones {
            writeln!(
                out,
                "      the clones' VMs were made before the pause ({s:.2} ms each): the fork created no KVM VM"
            )?;
        } else {
            writeln!(
                out,
                "      {} of {} clones took a VM shell made before the pause ({s:.2} ms each); the fork made the others' VMs",
                r.clones_from_shells, r.clones
            )?;
        }
    }
    writeln!(
        out,
        "memory: {:.1} MiB of host memory for {} VMs (sum of PSS {:.1} MiB); {} full copies \
         would take {:.1} MiB ({:.1}x more)",
        r.host_mib,
        r.vms.len(),
        r.pss_total_mib,
        r.vms.len(),
        r.full_copies_mib,
        r.full_copies_mib / r.host_mib.max(1e-9)
    )?;
    if let Some(s) = &r.swap {
        print_swap(out, s)?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "the experiment stopped early: {e}")?;
    }
    writeln!(
        out,
        "every VM verified: {}; every frame returned at exit: {}; {:.1} s in all",
        if r.verified { "yes" } else { "NO" },
        if r.frames_returned_at_exit {
            "yes"
        } else {
            "NO"
        },
        r.elapsed_s
    )
}

/// Writes the report to stdout: JSON with `json`, else `text`. A closed pipe ends quietly
/// (`Ok`); any other write error (a full disk) is [`CliError::Report`].
pub(crate) fn emit<T: serde::Serialize>(
    json: bool,
    r: &T,
    text: impl FnOnce(&mut dyn Write, &T) -> io::Result<()>,
) -> Result<(), CliError> {
    write_report(&mut io::stdout().lock(), json, r, text)
}

/// With `--events`: the report as the last event line, `{"event": "report", "report": ...}`.
pub(crate) fn emit_event_line<T: serde::Serialize>(r: &T) -> Result<(), CliError> {
    let line = serde_json::json!({ "event": "report", "report": r });
    write_report(&mut io::stdout().lock(), false, &line, |o, l| {
        serde_json::to_writer(&mut *o, l).map_err(io::Error::from)?;
        writeln!(o)
    })
}

/// [`emit`] to any writer.
pub(crate) fn write_report<T: serde::Serialize>(
    out: &mut dyn Write,
    json: bool,
    r: &T,
    text: impl FnOnce(&mut dyn Write, &T) -> io::Result<()>,
) -> Result<(), CliError> {
    let mut buf = io::BufWriter::new(out);
    let written = if json {
        serde_json::to_writer_pretty(&mut buf, r)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(buf))
    } else {
        text(&mut buf, r)
    };
    match written.and_then(|()| buf.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Report(e)),
    }
}

#[cfg(test)]
mod node_tests {
    #[test]
    fn one_pool_node_prints_nothing_and_several_say_what_they_are() {
        let mut out = Vec::new();
        super::print_nodes(&mut out, 1, "first-touch").unwrap();
        assert!(out.is_empty());
        super::print_nodes(&mut out, 2, "interleave").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("2 memory nodes (separate pools"), "{text}");
        assert!(text.ends_with("policy interleave\n"), "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fails(io::ErrorKind);

    impl Write for Fails {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_is_an_error_and_a_closed_pipe_is_not() {
        let r = serde_json::json!({ "a": 1 });
        let text = |o: &mut dyn Write, _: &serde_json::Value| writeln!(o, "hello");
        let full = write_report(&mut Fails(io::ErrorKind::StorageFull), false, &r, text);
        assert!(matches!(full, Err(CliError::Report(_))), "{full:?}");
        let full = write_report(&mut Fails(io::ErrorKind::StorageFull), true, &r, text);
        assert!(matches!(full, Err(CliError::Report(_))), "{full:?}");
        let pipe = write_report(&mut Fails(io::ErrorKind::BrokenPipe), false, &r, text);
        assert!(pipe.is_ok(), "{pipe:?}");
        let mut ok = Vec::new();
        assert!(write_report(&mut ok, false, &r, text).is_ok());
        assert_eq!(ok, b"hello\n");
    }
}
