//! The `vmm` command-line program: `run` launches test VMs on guestmem-managed memory and
//! runs a workload in them; `fork` snapshot-forks a running VM into clones and verifies
//! every one; `demo` is `fork` with sensible defaults, a progress display and a table.
//!
//! Exit status: 0 when everything ran and verified, 1 when a guest failed or a verify
//! found a mismatch, 2 for bad input or a host that cannot run the VMs (no `/dev/kvm`,
//! limits too low), always with a message saying what to do.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use guestmem::space::CounterSnapshot;
use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, MemoryUsage, Pool, PoolConfig};
use indicatif::{ProgressBar, ProgressStyle};
use vmm::guest::{DATA_START, MAX_RAM};
use vmm::workload::{Model, Placement, Workload};
use vmm::{
    CmdResult, Command, FaultCounts, ForkError, ForkOptions, Hypervisor, ManagedVm, Op, ShellPool,
    VcpuError, Vm, VmConfig, VmError,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

const WORKLOAD_HELP: &str = "\
WORKLOAD syntax: STEP[,STEP...], each STEP is OP[:KEY=VALUE...]
  ops:  fill (write the seed's pattern), verify (check it), touch (read a word per page),
        random (seeded random reads/writes), checksum (sum every word), dirty (write a word per page)
  keys: seed=N (default 1), offset=N (first page of the range, from the start of the vCPU's
        slice; default 0), pages=N (default: rest of the slice), count=N (random accesses,
        default 10000), stride=N (fork's second phase: clone k's range starts k*N pages later)
  offset, pages and stride also take sizes: 4M, 1G.
Each vCPU works on its own slice of guest RAM (above the 1 MiB boot region); its seeds are
offset by the vCPU index and by 1000 per VM (100000 per fork clone), so every slice holds its
own pattern and `verify:seed=N` checks what `fill:seed=N` wrote.
Example: --workload fill:seed=1,verify:seed=1,random:seed=7:count=100000,checksum";

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    about = "KVM guests on memory the VMM manages itself: run workloads, snapshot-fork running VMs",
    after_help = WORKLOAD_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AllocatorArg {
    /// Per-CPU magazines with a depot (seed 5).
    Magazine,
    /// Linux's per-cpu page lists.
    Percpu,
    /// One global lock.
    Global,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RmapArg {
    /// anon_vma chains (seed 2).
    Chain,
    /// One anon_vma per fork tree (pre-2010 Linux).
    Flat,
}

/// Options every subcommand shares.
#[derive(Debug, Clone, Args)]
struct Common {
    /// Guest RAM per VM: 256M, 1G ... (a multiple of 2 MiB, 4 MiB to 64 GiB).
    #[arg(long, default_value = "256M")]
    mem: String,
    /// vCPUs per VM (1 to 64); each works on its own slice of RAM.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Frame pool size (default: what the VMs can write, plus 16 MiB). The pool is
    /// sparse: host memory is used only for frames handed out.
    #[arg(long)]
    pool: Option<String>,
    /// Frame allocator design.
    #[arg(long, value_enum, default_value = "magazine")]
    allocator: AllocatorArg,
    /// Reverse-map design.
    #[arg(long, value_enum, default_value = "chain")]
    rmap: RmapArg,
    /// Pin every VM's vCPUs and fault handler to this host CPU (cross-CPU wake-ups cost).
    #[arg(long)]
    cpu: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ForkArgs {
    #[command(flatten)]
    common: Common,
    /// Clones to fork the VM into.
    #[arg(long, default_value_t = 8)]
    clones: usize,
    /// Workload run in the VM before the fork (see WORKLOAD syntax).
    #[arg(long, default_value = "fill:seed=1")]
    phase1: String,
    /// Workload run after the fork in the parent and in every clone, each with its own
    /// seeds; `stride` gives each VM its own range.
    #[arg(long, default_value = "fill:seed=2:pages=256:stride=256")]
    phase2: String,
    /// Also fork clone 1 once more and run the second phase in that grandchild.
    #[arg(long)]
    grandchild: bool,
    /// Create the clones' VMs (KVM VM, memslot, vCPUs, threads) before pausing the
    /// parent, so the fork itself creates none (the time to make them is reported apart).
    #[arg(long)]
    shells: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Launch VMs and run a workload in each (see WORKLOAD syntax below).
    #[command(after_help = WORKLOAD_HELP)]
    Run {
        #[command(flatten)]
        common: Common,
        /// VMs to run at once.
        #[arg(long, default_value_t = 1)]
        vms: u32,
        /// The guest commands to run.
        #[arg(long, default_value = "fill:seed=1,verify:seed=1")]
        workload: String,
    },
    /// Run a VM, snapshot-fork it into clones, run a second phase in each, verify all.
    #[command(after_help = WORKLOAD_HELP)]
    Fork(ForkArgs),
    /// A snapshot-fork experiment with defaults: a 256 MiB, 2-vCPU guest fills 192 MiB,
    /// forks into 8 clones (VM shells made beforehand), each rewrites its own 8 MiB (4 MiB
    /// per vCPU), the parent too, clone 1 forks again; every VM verifies all it holds.
    Demo {
        /// Clones.
        #[arg(long, default_value_t = 8)]
        clones: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// Why the program stopped.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Bad input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The host cannot run it: no KVM, limits (exit 2).
    #[error("{0}")]
    Host(String),
    /// A guest failed (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Host(_) => 2,
            CliError::Failed(_) => 1,
        }
    }

    /// A guest or VM error: host limits are exit 2, the rest 1 (classified by the
    /// error's variant, never by its text).
    fn from_run(e: impl HostLimit) -> CliError {
        if e.is_host_limit() {
            CliError::Host(e.to_string())
        } else {
            CliError::Failed(e.to_string())
        }
    }
}

/// The errors of running VMs, which know whether they are a host limit.
trait HostLimit: std::fmt::Display {
    fn is_host_limit(&self) -> bool;
}

impl HostLimit for VmError {
    fn is_host_limit(&self) -> bool {
        VmError::is_host_limit(self)
    }
}

impl HostLimit for VcpuError {
    fn is_host_limit(&self) -> bool {
        VcpuError::is_host_limit(self)
    }
}

impl HostLimit for ForkError {
    fn is_host_limit(&self) -> bool {
        ForkError::is_host_limit(self)
    }
}

/// Parses `4096`, `64K`, `256M`, `1G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional K/M/G unit"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("size {s:?} must be non-zero and fit in 64 bits"))
}

/// Guest RAM from `--mem`, checked.
fn guest_mem(s: &str) -> Result<u64, CliError> {
    let mem = parse_size(s).map_err(|e| CliError::Usage(format!("--mem: {e}")))?;
    if mem % (2 * MIB) != 0 || !(4 * MIB..=MAX_RAM).contains(&mem) {
        return Err(CliError::Usage(format!(
            "--mem {s} must be a multiple of 2 MiB between 4 MiB and {} GiB",
            MAX_RAM >> 30
        )));
    }
    Ok(mem)
}

/// Opens `/dev/kvm`, or says why not and what to do.
fn hypervisor() -> Result<Hypervisor, CliError> {
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
    Hypervisor::new().map_err(|e| CliError::Host(e.to_string()))
}

/// The frame pool's size: `--pool` or `default_pool`, checked against `need`.
fn pool_bytes(common: &Common, default_pool: u64, need: u64) -> Result<u64, CliError> {
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

/// The pool and manager the VMs run on.
fn manager(common: &Common, bytes: u64) -> Result<Arc<Manager>, CliError> {
    let allocator = match common.allocator {
        AllocatorArg::Magazine => AllocatorKind::Magazine,
        AllocatorArg::Percpu => AllocatorKind::PerCpuLists,
        AllocatorArg::Global => AllocatorKind::GlobalLock,
    };
    let pool = Pool::new(&PoolConfig::uniform(bytes, 1, allocator))
        .map_err(|e| CliError::Host(format!("cannot create a frame pool of {bytes} bytes: {e}")))?;
    let mut cfg = ManagerConfig::default();
    cfg.rmap.design = match common.rmap {
        RmapArg::Chain => rmap::Design::Chain,
        RmapArg::Flat => rmap::Design::Flat,
    };
    Ok(Manager::new(Arc::new(pool), cfg))
}

fn workload(flag: &str, s: &str) -> Result<Workload, CliError> {
    s.parse()
        .map_err(|e| CliError::Usage(format!("{flag} {s:?}: {e}")))
}

/// Pages per vCPU slice of a guest of `mem` bytes with `vcpus` vCPUs.
fn slice_pages(mem: u64, vcpus: u32) -> u64 {
    (mem - DATA_START) / PAGE / u64::from(vcpus)
}

/// Each vCPU's commands for `w` (seeds offset as the WORKLOAD help says).
fn plan(
    w: &Workload,
    mem: u64,
    vcpus: u32,
    seed_offset: u64,
    stride_index: u64,
) -> Result<Vec<Vec<Command>>, CliError> {
    let per = slice_pages(mem, vcpus);
    (0..u64::from(vcpus))
        .map(|i| {
            w.commands(&Placement {
                slice_start: Gfn(DATA_START / PAGE + i * per),
                slice_pages: per,
                seed_offset: seed_offset + i,
                stride_index,
            })
            .map_err(|e| CliError::Usage(e.to_string()))
        })
        .collect()
}

/// Pages a plan may write (fill, random, dirty ranges).
fn written_pages(plan: &[Vec<Command>]) -> u64 {
    plan.iter()
        .flatten()
        .filter(|c| matches!(c.op, Op::Fill | Op::Random | Op::Dirty))
        .map(|c| c.pages)
        .sum()
}

/// One step's outcome over all vCPUs.
#[derive(Debug, Clone, serde::Serialize)]
struct StepReport {
    op: Op,
    pages: u64,
    /// Verify: mismatched words; others: 0.
    mismatches: u64,
    /// Checksum/touch/random: the guest's sums (wrapping) over the vCPUs.
    result: u64,
    ms: f64,
}

/// Runs each step on every vCPU at once (vCPU `i` gets `plan[i][step]`), records it in
/// `model` and returns the per-step reports.
fn run_plan(
    vm: &Vm,
    plan: &[Vec<Command>],
    model: &mut Model,
) -> Result<Vec<StepReport>, CliError> {
    let steps = plan.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(steps);
    for s in 0..steps {
        let t = Instant::now();
        for (v, cmds) in vm.vcpus().iter().zip(plan) {
            v.submit(cmds[s]).map_err(CliError::from_run)?;
        }
        let mut rep = StepReport {
            op: plan[0][s].op,
            pages: 0,
            mismatches: 0,
            result: 0,
            ms: 0.0,
        };
        for (v, cmds) in vm.vcpus().iter().zip(plan) {
            let r: CmdResult = v.wait().map_err(CliError::from_run)?;
            rep.pages += cmds[s].pages;
            if cmds[s].op == Op::Verify {
                rep.mismatches += r.mismatches();
            } else {
                rep.result = rep.result.wrapping_add(r.r0);
            }
            model.apply(&cmds[s]);
        }
        rep.ms = t.elapsed().as_secs_f64() * 1e3;
        out.push(rep);
    }
    Ok(out)
}

/// Verifies every page whose pattern `model` knows, spreading the commands over the vCPUs;
/// returns (pages checked, mismatched words).
fn verify_model(vm: &Vm, model: &Model) -> Result<(u64, u64), CliError> {
    let cmds = model.verify_commands();
    let n = vm.vcpus().len();
    let (mut pages, mut bad) = (0, 0);
    for chunk in cmds.chunks(n) {
        for (v, c) in vm.vcpus().iter().zip(chunk) {
            v.submit(*c).map_err(CliError::from_run)?;
        }
        for (v, c) in vm.vcpus().iter().zip(chunk) {
            bad += v.wait().map_err(CliError::from_run)?.mismatches();
            pages += c.pages;
        }
    }
    Ok((pages, bad))
}

/// Memory in MiB, for reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct MemMib {
    resident: f64,
    shared: f64,
    private: f64,
    pss: f64,
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
struct VmRunReport {
    vm: u32,
    steps: Vec<StepReport>,
    faults: FaultCounts,
    counters: CounterSnapshot,
    memory_pages: MemoryUsage,
    memory_mib: MemMib,
    window_host_mappings: Option<u64>,
    verified: bool,
}

#[derive(Debug, serde::Serialize)]
struct RunReport {
    mem_bytes: u64,
    vcpus: u32,
    vms: Vec<VmRunReport>,
    pool_bytes: u64,
    host_resident_bytes: Option<u64>,
    frames_returned_at_exit: bool,
    verified: bool,
}

fn cmd_run(common: &Common, vms: u32, w: &str) -> Result<RunReport, CliError> {
    let mem = guest_mem(&common.mem)?;
    if common.vcpus == 0 || common.vcpus > 64 {
        return Err(CliError::Usage("--vcpus must be between 1 and 64".into()));
    }
    if vms == 0 || vms > 1000 {
        return Err(CliError::Usage("--vms must be between 1 and 1000".into()));
    }
    let w = workload("--workload", w)?;
    let plans = (0..vms)
        .map(|v| plan(&w, mem, common.vcpus, 1000 * u64::from(v), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let total = mem * u64::from(vms);
    let bytes = pool_bytes(common, total + 16 * MIB, total)?;
    let hv = hypervisor()?;
    let mm = manager(common, bytes)?;
    let pool = mm.pool().clone();
    let cfg = VmConfig {
        cpu: common.cpu,
        ..VmConfig::new(mem, common.vcpus)
    };
    // Each VM holds a few descriptors (KVM VM, vCPUs, userfaultfd, event fds): check the
    // limit up front (after raising the soft limit to the hard one) for a clear message.
    let limit = vmm::raise_nofile_limit();
    let open = vmm::open_fds().unwrap_or(0);
    let need = u64::from(vms) * (4 + u64::from(common.vcpus));
    if open + need + 16 > limit {
        return Err(CliError::Host(format!(
            "{vms} VMs need about {need} file descriptors and {open} are open, but the open-file limit is {limit}: raise it (ulimit -n, or LimitNOFILE) or run fewer VMs"
        )));
    }
    let machines = (0..vms)
        .map(|_| ManagedVm::new(&hv, &cfg, &mm).map_err(CliError::from_run))
        .collect::<Result<Vec<_>, _>>()?;
    let results: Vec<Result<(Vec<StepReport>, u64), CliError>> = std::thread::scope(|s| {
        let handles: Vec<_> = machines
            .iter()
            .zip(&plans)
            .map(|(m, p)| {
                s.spawn(move || {
                    let mut model = Model::new();
                    let steps = run_plan(m.vm(), p, &mut model)?;
                    let bad = steps.iter().map(|r| r.mismatches).sum();
                    Ok((steps, bad))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Failed("a VM thread panicked".into())))
            })
            .collect()
    });
    let mut reports = Vec::new();
    for (i, (m, r)) in machines.iter().zip(results).enumerate() {
        let (steps, bad) = r?;
        let memory = m.memory();
        reports.push(VmRunReport {
            vm: i as u32,
            steps,
            faults: m.fault_counts(),
            counters: m.counters(),
            memory_pages: memory,
            memory_mib: memory.into(),
            window_host_mappings: m.vm().window().host_mappings(),
            verified: bad == 0,
        });
    }
    let host_resident_bytes = pool.resident_bytes().ok();
    drop(machines);
    Ok(RunReport {
        mem_bytes: mem,
        vcpus: common.vcpus,
        verified: reports.iter().all(|r| r.verified),
        vms: reports,
        pool_bytes: pool.total_frames() * PAGE,
        host_resident_bytes,
        frames_returned_at_exit: pool.free_frames() == pool.total_frames(),
    })
}

fn print_run(r: &RunReport) {
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
struct ForkVmReport {
    role: String,
    memory_pages: MemoryUsage,
    memory_mib: MemMib,
    cow_copies: u64,
    cow_reuses: u64,
    faults: FaultCounts,
    /// Creating this clone (address-space fork, VM, vCPUs, state), ms.
    fork_ms: Option<f64>,
    pages_verified: u64,
    mismatches: u64,
    verified: bool,
}

#[derive(Debug, serde::Serialize)]
struct ForkReport {
    mem_bytes: u64,
    vcpus: u32,
    clones: usize,
    vms: Vec<ForkVmReport>,
    /// Pause to the last clone running, ms.
    fork_total_ms: f64,
    /// Pausing the parent (vCPUs parked, queued faults drained), ms.
    fork_pause_ms: f64,
    /// Saving the parent's vCPU state, ms.
    fork_save_ms: f64,
    /// Moving the parent into a fresh VM and window, ms.
    fork_rebirth_ms: f64,
    /// Mean per clone, ms.
    fork_per_clone_ms: f64,
    /// The grandchild's fork (clone 1 forked once), ms.
    grandchild_fork_ms: Option<f64>,
    /// With `--shells`: making one clone's VM shell before the fork, ms (mean).
    shell_ms_per_clone: Option<f64>,
    /// Host memory the pool's frames hold, MiB.
    host_mib: f64,
    /// What every VM holding its own full copy of the parent's memory would take, MiB.
    full_copies_mib: f64,
    /// Sum of the VMs' PSS, MiB (equals the frames in use).
    pss_total_mib: f64,
    frames_returned_at_exit: bool,
    verified: bool,
    elapsed_s: f64,
}

struct ForkParams<'a> {
    common: &'a Common,
    clones: usize,
    phase1: &'a str,
    phase2: &'a str,
    grandchild: bool,
    shells: bool,
    progress: bool,
}

fn cmd_fork(p: &ForkParams<'_>) -> Result<ForkReport, CliError> {
    let started = Instant::now();
    let common = p.common;
    let mem = guest_mem(&common.mem)?;
    if common.vcpus == 0 || common.vcpus > 64 {
        return Err(CliError::Usage("--vcpus must be between 1 and 64".into()));
    }
    if p.clones == 0 || p.clones > 10_000 {
        return Err(CliError::Usage(
            "--clones must be between 1 and 10000".into(),
        ));
    }
    let (w1, w2) = (
        workload("--phase1", p.phase1)?,
        workload("--phase2", p.phase2)?,
    );
    let vcpus = common.vcpus;
    let plan1 = plan(&w1, mem, vcpus, 0, 0)?;
    let extra = usize::from(p.grandchild);
    // VM k of phase 2: 0 the parent, 1..=clones the clones, then the grandchild.
    let plans2 = (0..=p.clones + extra)
        .map(|k| plan(&w2, mem, vcpus, 100_000 * k as u64, k as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let per_clone = plans2.iter().map(|pl| written_pages(pl)).max().unwrap_or(0);
    let need = mem + (p.clones + extra) as u64 * per_clone * PAGE;
    let bar = if p.progress && !common.json {
        let b = ProgressBar::new((4 + 2 * (p.clones + extra)) as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    } else {
        ProgressBar::hidden()
    };
    let bytes = pool_bytes(common, need + 16 * MIB, mem)?;
    bar.set_message("opening /dev/kvm");
    let hv = hypervisor()?;
    let mm = manager(common, bytes)?;
    let pool = mm.pool().clone();
    let cfg = VmConfig {
        cpu: common.cpu,
        ..VmConfig::new(mem, vcpus)
    };
    bar.set_message("booting the parent VM");
    let parent = ManagedVm::new(&hv, &cfg, &mm).map_err(CliError::from_run)?;
    bar.inc(1);
    bar.set_message("phase 1 in the parent");
    let mut parent_model = Model::new();
    let steps1 = run_plan(parent.vm(), &plan1, &mut parent_model)?;
    let bad1: u64 = steps1.iter().map(|s| s.mismatches).sum();
    bar.inc(1);
    bar.set_message(format!("forking into {} clones", p.clones));
    let opts = ForkOptions {
        clones: p.clones,
        reserve_pages: per_clone,
    };
    let fork_err = |e: ForkError| CliError::from_run(e);
    let mut shell_ms = None;
    let shells = ShellPool::new(&cfg);
    if p.shells {
        bar.set_message(format!("making {} VM shells", p.clones));
        let t = Instant::now();
        shells.fill(&hv, p.clones).map_err(CliError::from_run)?;
        shell_ms = Some(t.elapsed().as_secs_f64() * 1e3 / p.clones as f64);
        bar.set_message(format!("forking into {} clones", p.clones));
    }
    let (clones, timing) = parent
        .fork_with(&hv, &opts, Some(&shells))
        .map_err(fork_err)?;
    bar.inc(1);
    // Phase 2 everywhere at once (the parent too: it keeps running).
    bar.set_message("phase 2 in the parent and every clone");
    let mut models = vec![parent_model.clone(); p.clones + 1];
    models[0] = parent_model;
    let mut vms: Vec<&ManagedVm> = std::iter::once(&parent).chain(clones.iter()).collect();
    run_phase2(&vms, &plans2, &mut models, &bar)?;
    let mut grandchild = None;
    let mut grandchild_ms = None;
    if p.grandchild {
        bar.set_message("forking clone 1 again");
        let (mut g, t) = clones[0]
            .fork(
                &hv,
                &ForkOptions {
                    clones: 1,
                    reserve_pages: per_clone,
                },
            )
            .map_err(fork_err)?;
        grandchild_ms = Some(t.total_ns as f64 / 1e6);
        grandchild = g.pop();
        bar.inc(1);
        if let Some(g) = &grandchild {
            let mut m = models[1].clone();
            run_plan(g.vm(), &plans2[p.clones + 1], &mut m)?;
            models.push(m);
            vms.push(g);
        }
        bar.inc(1);
    }
    bar.set_message("verifying every VM");
    let verified: Vec<Result<(u64, u64), CliError>> = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .zip(&models)
            .map(|(vm, model)| {
                let bar = bar.clone();
                s.spawn(move || {
                    let r = verify_model(vm.vm(), model);
                    bar.inc(1);
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Failed("a VM thread panicked".into())))
            })
            .collect()
    });
    let mut rows = Vec::new();
    for (k, (vm, v)) in vms.iter().zip(verified).enumerate() {
        let (pages, bad) = v?;
        let bad = bad + if k == 0 { bad1 } else { 0 };
        let memory = vm.memory();
        let c = vm.counters();
        rows.push(ForkVmReport {
            role: match k {
                0 => "parent".into(),
                k if k <= p.clones => format!("clone {k}"),
                _ => "clone 1.1".into(),
            },
            memory_pages: memory,
            memory_mib: memory.into(),
            cow_copies: c.cow_copies,
            cow_reuses: c.cow_reuses,
            faults: vm.fault_counts(),
            fork_ms: match k {
                0 => None,
                k if k <= p.clones => timing.clone_ns.get(k - 1).map(|&n| n as f64 / 1e6),
                _ => grandchild_ms,
            },
            pages_verified: pages,
            mismatches: bad,
            verified: bad == 0,
        });
    }
    bar.finish_and_clear();
    let mib = |pages: f64| pages * PAGE as f64 / MIB as f64;
    let parent_resident = rows[0].memory_pages.resident;
    let report = ForkReport {
        mem_bytes: mem,
        vcpus,
        clones: p.clones,
        fork_total_ms: timing.total_ns as f64 / 1e6,
        fork_pause_ms: timing.pause_ns as f64 / 1e6,
        fork_save_ms: timing.save_ns as f64 / 1e6,
        fork_rebirth_ms: timing.rebirth_ns as f64 / 1e6,
        fork_per_clone_ms: timing.total_ns as f64 / 1e6 / p.clones as f64,
        grandchild_fork_ms: grandchild_ms,
        shell_ms_per_clone: shell_ms,
        host_mib: pool.resident_bytes().unwrap_or(0) as f64 / MIB as f64,
        full_copies_mib: mib((parent_resident * rows.len() as u64) as f64),
        pss_total_mib: rows.iter().map(|r| r.memory_mib.pss).sum(),
        verified: rows.iter().all(|r| r.verified),
        vms: rows,
        frames_returned_at_exit: false,
        elapsed_s: 0.0,
    };
    drop(vms);
    drop(grandchild);
    drop(clones);
    drop(parent);
    Ok(ForkReport {
        frames_returned_at_exit: pool.free_frames() == pool.total_frames(),
        elapsed_s: started.elapsed().as_secs_f64(),
        ..report
    })
}

/// Runs phase 2 in every VM at once (VM k gets `plans[k]`).
fn run_phase2(
    vms: &[&ManagedVm],
    plans: &[Vec<Vec<Command>>],
    models: &mut [Model],
    bar: &ProgressBar,
) -> Result<(), CliError> {
    std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .zip(plans)
            .zip(models.iter_mut())
            .map(|((vm, plan), model)| {
                let bar = bar.clone();
                s.spawn(move || {
                    let r = run_plan(vm.vm(), plan, model).map(|_| ());
                    bar.inc(1);
                    r
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(CliError::Failed("a VM thread panicked".into())))
        })
    })
}

fn print_fork(r: &ForkReport) {
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

fn emit<T: serde::Serialize>(json: bool, r: &T, text: impl FnOnce(&T)) {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmm: cannot format the report: {e}"),
        }
    } else {
        text(r);
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let demo_common;
    let result = match &cli.cmd {
        Cmd::Run {
            common,
            vms,
            workload,
        } => cmd_run(common, *vms, workload).map(|r| {
            emit(common.json, &r, print_run);
            r.verified
        }),
        Cmd::Fork(a) => cmd_fork(&ForkParams {
            common: &a.common,
            clones: a.clones,
            phase1: &a.phase1,
            phase2: &a.phase2,
            grandchild: a.grandchild,
            shells: a.shells,
            progress: false,
        })
        .map(|r| {
            emit(a.common.json, &r, print_fork);
            r.verified
        }),
        Cmd::Demo { clones, json } => {
            demo_common = Common {
                mem: "256M".into(),
                vcpus: 2,
                pool: None,
                allocator: AllocatorArg::Magazine,
                rmap: RmapArg::Chain,
                cpu: None,
                json: *json,
            };
            cmd_fork(&ForkParams {
                common: &demo_common,
                clones: *clones,
                // Each vCPU fills 96 of its 127 MiB; after the fork every VM rewrites its own
                // 4 MiB per vCPU (the parent too), clone 1's child another.
                phase1: "fill:seed=1:pages=96M",
                phase2: "fill:seed=2:pages=4M:stride=4M",
                grandchild: true,
                shells: true,
                progress: true,
            })
            .map(|r| {
                emit(*json, &r, print_fork);
                r.verified
            })
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vmm: a verify found mismatches (see the report)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(e.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
