//! What `run` and `fork` report, as JSON (serde) or as text.

use guestmem::MemoryUsage;
use guestmem::space::CounterSnapshot;
use vmm::{FaultCounts, Op};

use super::limits::{MIB, PAGE};
use super::steps::StepReport;

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
    pub verified: bool,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct RunReport {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub vms: Vec<VmRunReport>,
    pub pool_bytes: u64,
    pub host_resident_bytes: Option<u64>,
    pub frames_returned_at_exit: bool,
    pub verified: bool,
}

pub(crate) fn print_run(r: &RunReport) {
    println!(
        "{} VM(s) of {} MiB, {} vCPU(s) each, on a {} MiB frame pool",
        r.vms.len(),
        r.mem_bytes / MIB,
        r.vcpus,
        r.pool_bytes / MIB
    );
    for v in &r.vms {
        println!("VM {}:", v.vm);
        for s in &v.steps {
            let what = match s.op {
                Op::Verify if s.mismatches == 0 => "ok".to_string(),
                Op::Verify => format!("{} BAD WORDS", s.mismatches),
                Op::Fill | Op::Dirty => String::new(),
                _ => format!("result {:#x}", s.result),
            };
            println!(
                "  {:<9} {:>8} pages {:>9.1} ms  {what}",
                format!("{:?}", s.op).to_lowercase(),
                s.pages,
                s.ms
            );
        }
        let f = &v.faults;
        println!(
            "  faults: {} missing-read, {} missing-write, {} write-protect; zero-filled {} pages, \
             {} COW copies, {} COW reuses",
            f.missing_read,
            f.missing_write,
            f.write_protect,
            v.counters.zero_fill_pages,
            v.counters.cow_copies,
            v.counters.cow_reuses
        );
        let m = &v.memory_mib;
        println!(
            "  memory: resident {:.1} MiB, shared {:.1}, private {:.1}, PSS {:.1}; {} host mappings; verify {}",
            m.resident,
            m.shared,
            m.private,
            m.pss,
            v.window_host_mappings.unwrap_or(0),
            if v.verified { "passed" } else { "FAILED" }
        );
    }
    println!(
        "host memory used by guest frames: {:.1} MiB; every frame returned at exit: {}; all verifies {}",
        r.host_resident_bytes.unwrap_or(0) as f64 / MIB as f64,
        if r.frames_returned_at_exit {
            "yes"
        } else {
            "NO"
        },
        if r.verified { "passed" } else { "FAILED" }
    );
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
    pub pages_verified: u64,
    pub mismatches: u64,
    pub verified: bool,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct ForkReport {
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
    /// Host memory the pool's frames hold, MiB.
    pub host_mib: f64,
    /// What every VM holding its own full copy of the parent's memory would take, MiB.
    pub full_copies_mib: f64,
    /// Sum of the VMs' PSS, MiB (equals the frames in use).
    pub pss_total_mib: f64,
    pub frames_returned_at_exit: bool,
    pub verified: bool,
    pub elapsed_s: f64,
}

pub(crate) fn print_fork(r: &ForkReport) {
    println!(
        "snapshot-fork of a {} MiB, {}-vCPU guest into {} clones{}",
        r.mem_bytes / MIB,
        r.vcpus,
        r.clones,
        if r.grandchild_fork_ms.is_some() {
            " (and a clone of clone 1)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7}",
        "VM", "resident", "shared", "private", "PSS", "COW", "faults", "fork ms", "verify"
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7}",
        "", "MiB", "MiB", "MiB", "MiB", "copies", "", "", ""
    );
    for v in &r.vms {
        let m = &v.memory_mib;
        println!(
            "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>8} {:>8} {:>9} {:>7}",
            v.role,
            m.resident,
            m.shared,
            m.private,
            m.pss,
            v.cow_copies,
            v.faults.total(),
            v.fork_ms.map_or("-".into(), |t| format!("{t:.2}")),
            if v.verified { "ok" } else { "FAILED" }
        );
    }
    println!();
    println!(
        "fork: {:.2} ms from pause to {} clones running ({:.2} ms per clone; pause {:.3} ms, \
         save {:.3} ms, parent to a fresh VM {:.2} ms)",
        r.fork_total_ms,
        r.clones,
        r.fork_per_clone_ms,
        r.fork_pause_ms,
        r.fork_save_ms,
        r.fork_rebirth_ms
    );
    if let Some(s) = r.shell_ms_per_clone {
        println!(
            "      the clones' VMs were made before the pause ({s:.2} ms each): the fork created no KVM VM"
        );
    }
    println!(
        "memory: {:.1} MiB of host memory for {} VMs (sum of PSS {:.1} MiB); {} full copies \
         would take {:.1} MiB ({:.1}x more)",
        r.host_mib,
        r.vms.len(),
        r.pss_total_mib,
        r.vms.len(),
        r.full_copies_mib,
        r.full_copies_mib / r.host_mib.max(1e-9)
    );
    println!(
        "every VM verified: {}; every frame returned at exit: {}; {:.1} s in all",
        if r.verified { "yes" } else { "NO" },
        if r.frames_returned_at_exit {
            "yes"
        } else {
            "NO"
        },
        r.elapsed_s
    );
}

pub(crate) fn emit<T: serde::Serialize>(json: bool, r: &T, text: impl FnOnce(&T)) {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmm: cannot format the report: {e}"),
        }
    } else {
        text(r);
    }
}
