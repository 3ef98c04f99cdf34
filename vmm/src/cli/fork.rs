//! `vmm fork` (and `vmm demo`): run a VM, snapshot-fork it into clones, run a second phase
//! in the parent and every clone at once, verify every VM against what it wrote.
//!
//! Every step of every VM (phase 1 in the parent, phase 2 everywhere, the grandchild's)
//! and every final verify reaches the report and the verdict. A VM that fails in phase 2
//! is reported as stopped while the others go on; a failure before or during the fork
//! stops the experiment, and the report still shows what had run.

use std::time::Instant;

use serde_json::json;
use vmm::worker::{RemoteShells, RemoteVm, WorkerPool};
use vmm::workload::{Model, Workload, WorkloadError};
use vmm::{Command, ForkOptions, ManagedVm, ShellPool, VmConfig};

use super::args::Common;
use super::error::CliError;
use super::feedback::Feedback;
use super::limits::{
    MIB, PAGE, check_cpu, check_fds, check_host_memory, check_vcpus, default_pool, fork_need,
    guest_mem, hypervisor, manager, pool_bytes, touched_bytes,
};
use super::report::{Config, ForkReport, ForkVmReport, VmSwap};
use super::steps::{Deadline, StepReport, plan, run_plan, verify_model, workload, written_pages};

pub(crate) struct ForkParams<'a> {
    pub common: &'a Common,
    pub clones: usize,
    pub phase1: &'a str,
    pub phase2: &'a str,
    pub grandchild: bool,
    pub shells: bool,
    /// `vmm demo`: its limits are stated as demo's (it has no `--mem` or `--phase2`).
    pub demo: bool,
    /// `--events`: JSON lines on stdout.
    pub events: bool,
    /// `--parent`: what the first fork does with the parent's window.
    pub parent: vmm::ParentMode,
    /// While phase 2 runs, move phase-2 VM `.0`'s memory (0 the parent, then the clones)
    /// to node `.1` (the demo's live move).
    pub live_move: Option<(usize, u16)>,
    /// `--vcpu-nodes`: each vCPU's home node.
    pub vcpu_nodes: Option<&'a [u16]>,
    /// `--workers`: the clones are held by this many worker processes (0: by this one).
    pub workers: usize,
}

/// The most worker processes `--workers` starts.
pub(crate) const MAX_WORKERS: usize = 64;

/// A VM of the experiment: in this process, or held by a worker process.
enum MemberVm {
    Local(ManagedVm),
    Remote(RemoteVm),
}

impl MemberVm {
    fn space(&self) -> &std::sync::Arc<guestmem::AddressSpace> {
        match self {
            MemberVm::Local(v) => v.space(),
            MemberVm::Remote(v) => v.space(),
        }
    }

    fn guest(&self) -> &dyn super::steps::Guest {
        match self {
            MemberVm::Local(v) => v.vm(),
            MemberVm::Remote(v) => v,
        }
    }

    fn local(&self) -> Option<&ManagedVm> {
        match self {
            MemberVm::Local(v) => Some(v),
            MemberVm::Remote(_) => None,
        }
    }

    fn fault_counts(&self) -> vmm::FaultCounts {
        match self {
            MemberVm::Local(v) => v.fault_counts(),
            // A worker that is gone has no counts to give: the row's error says why.
            MemberVm::Remote(v) => v.fault_counts().map(|(c, _)| c).unwrap_or_default(),
        }
    }

    fn stop(&self) {
        match self {
            MemberVm::Local(v) => v.vm().stop(),
            MemberVm::Remote(v) => v.stop(),
        }
    }
}

/// The name of phase 2's VM `k` (0 the parent, then the clones, then the grandchild).
fn role(k: usize, clones: usize) -> String {
    match k {
        0 => "parent".into(),
        k if k <= clones => format!("clone {k}"),
        _ => "clone 1.1".into(),
    }
}

/// A VM of the experiment and what happened to it.
struct Member {
    role: String,
    vm: MemberVm,
    model: Model,
    steps: Vec<StepReport>,
    fork_ms: Option<f64>,
    /// The final verify: (pages, bad words).
    verify: Option<(u64, u64)>,
    /// Why it stopped early.
    error: Option<CliError>,
}

impl Member {
    fn new(role: String, vm: MemberVm, model: Model, fork_ms: Option<f64>) -> Member {
        Member {
            role,
            vm,
            model,
            steps: Vec::new(),
            fork_ms,
            verify: None,
            error: None,
        }
    }

    /// `e`'s text with the memory manager's name of this VM (`vm6`) replaced by the
    /// report's (`clone 3`).
    fn named(&self, e: &CliError) -> String {
        name_vm(
            &e.to_string(),
            &self.vm.space().id().to_string(),
            &self.role,
        )
    }

    fn step_mismatches(&self) -> u64 {
        self.steps.iter().map(|s| s.mismatches).sum()
    }

    /// This VM's report row; `swap_on`: with its swap figures.
    fn row(&self, swap_on: bool) -> ForkVmReport {
        let memory = self.vm.space().memory();
        let c = self.vm.space().counters();
        let (pages, fin) = self.verify.unwrap_or((0, 0));
        let steps = self.step_mismatches();
        ForkVmReport {
            role: self.role.clone(),
            memory_pages: memory,
            memory_mib: memory.into(),
            cow_copies: c.cow_copies,
            cow_reuses: c.cow_reuses,
            faults: self.vm.fault_counts(),
            fork_ms: self.fork_ms,
            steps: self.steps.clone(),
            step_mismatches: steps,
            final_verify_ran: self.verify.is_some(),
            pages_verified: pages,
            final_mismatches: fin,
            mismatches: steps.saturating_add(fin),
            error: self.error.as_ref().map(|e| self.named(e)),
            verified: self.error.is_none() && self.verify.is_some() && steps == 0 && fin == 0,
            swap: swap_on.then(|| VmSwap::of(&memory, &c)),
        }
    }
}

/// `text` with every whole-word `id` replaced by `role`.
fn name_vm(text: &str, id: &str, role: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(id) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + id.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        out.push_str(&rest[..i]);
        out.push_str(if word(before) || word(after) {
            id
        } else {
            role
        });
        rest = &rest[i + id.len()..];
    }
    out.push_str(rest);
    out
}

/// What the experiment has made and measured so far.
#[derive(Default)]
struct Experiment {
    /// Dropped first: a remote clone ends in its worker before the workers go.
    members: Vec<Member>,
    remote_shells: Option<RemoteShells>,
    workers: Option<WorkerPool>,
    timing: Option<vmm::ForkTiming>,
    grandchild_ms: Option<f64>,
    shell_ms: Option<f64>,
    live_move: Option<LiveMove>,
}

/// The checked plan of a fork experiment.
struct Plan {
    mem: u64,
    cfg: VmConfig,
    plan1: Vec<Vec<Command>>,
    /// VM k of phase 2: 0 the parent, 1..=clones the clones, then the grandchild.
    plans2: Vec<Vec<Vec<Command>>>,
    per_clone: u64,
}

/// The most clones whose phase-2 ranges fit when `w2`'s strides move VM k's range `k`
/// strides on (VMs 0 ..= clones + extra).
fn max_clones(w2: &Workload, mem: u64, vcpus: u32, extra: usize) -> Option<usize> {
    (1..=10_000usize)
        .take_while(|&n| plan(w2, mem, vcpus, 0, (n + extra) as u64).is_ok())
        .last()
}

/// Checks everything the command line asks for (before anything is created).
fn check(p: &ForkParams<'_>) -> Result<Plan, CliError> {
    let common = p.common;
    let mem = guest_mem(&common.mem)?;
    check_vcpus(common.vcpus)?;
    let max = if p.demo { DEMO_MAX_CLONES } else { 10_000 };
    if p.clones == 0 || p.clones > max {
        return Err(CliError::Usage(if p.demo {
            format!(
                "--clones must be between 1 and {DEMO_MAX_CLONES} for the demo (each VM rewrites \
                 its own 4 MiB per vCPU of a 256 MiB guest): for more, use `vmm fork` with a \
                 bigger --mem"
            )
        } else {
            "--clones must be between 1 and 10000".into()
        }));
    }
    check_cpu(common.cpu)?;
    super::limits::check_nodes(common)?;
    if p.workers > MAX_WORKERS {
        return Err(CliError::Usage(format!(
            "--workers must be between 1 and {MAX_WORKERS} (0 or none: the clones in this process)"
        )));
    }
    if p.workers > 0 {
        let not_yet = |what: &str| {
            CliError::Usage(format!(
                "--workers with {what} is not supported yet: the clones in worker processes                  cannot be forked again, read from this process or given vCPU homes; drop one                  of the two"
            ))
        };
        if p.grandchild {
            return Err(not_yet("--grandchild"));
        }
        if p.vcpu_nodes.is_some() {
            return Err(not_yet("--vcpu-nodes"));
        }
        if common.corrupt.as_deref().is_some_and(|c| c != "parent") {
            return Err(not_yet("--corrupt of a clone"));
        }
        if p.live_move.is_some_and(|(k, _)| k > 0) {
            return Err(not_yet("a live move of a clone"));
        }
    }
    if let Some(list) = p.vcpu_nodes {
        super::limits::check_vcpu_nodes(list, common.nodes)?;
    }
    if let Some(c) = &common.corrupt {
        let extra = usize::from(p.grandchild);
        if !(0..=p.clones + extra).any(|k| role(k, p.clones) == *c) {
            return Err(CliError::Usage(format!(
                "--corrupt {c:?}: no such VM (parent, clone 1 .. clone {}{})",
                p.clones,
                if p.grandchild { ", clone 1.1" } else { "" }
            )));
        }
    }
    let (w1, w2) = (
        workload("--phase1", p.phase1)?,
        workload("--phase2", p.phase2)?,
    );
    if w1.has_stride() {
        return Err(CliError::Usage(format!(
            "--phase1 {:?}: stride applies only to --phase2 (it gives each VM of the fork its \
             own range); drop it",
            p.phase1
        )));
    }
    let vcpus = common.vcpus;
    let plan1 = plan(&w1, mem, vcpus, 0, 0)?;
    let extra = usize::from(p.grandchild);
    let plans2 = (0..=p.clones + extra)
        .map(|k| plan(&w2, mem, vcpus, 100_000 * k as u64, k as u64))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match e {
            CliError::Workload {
                source: WorkloadError::OutOfSlice { stride, .. },
                ..
            } if stride > 0 => {
                let fit = max_clones(&w2, mem, vcpus, extra).unwrap_or(0);
                CliError::Usage(format!(
                    "--clones {}: VM k's --phase2 range starts k x stride={stride} pages on, and \
                     only {fit} clones fit in {} MiB guests with {vcpus} vCPU(s){}: fork fewer \
                     clones, use a smaller stride or range, or a bigger --mem",
                    p.clones,
                    mem / MIB,
                    if p.grandchild {
                        " and the grandchild"
                    } else {
                        ""
                    }
                ))
            }
            e => e,
        })?;
    let per_clone = plans2
        .iter()
        .map(|pl| written_pages(pl))
        .try_fold(0, |max, w| w.map(|w| w.max(max)))?;
    Ok(Plan {
        mem,
        cfg: VmConfig {
            cpu: common.cpu,
            ..VmConfig::new(mem, vcpus)
        },
        plan1,
        plans2,
        per_clone,
    })
}

/// The most clones `vmm demo` runs: VM k (the parent 0, the clones, the grandchild)
/// rewrites 4 MiB at k x 4 MiB of each vCPU's 127.5 MiB slice.
pub(crate) const DEMO_MAX_CLONES: usize = 29;
/// The demo's overcommit phase: guest RAM per VM.
pub(crate) const DEMO_OC_MEM: &str = "64M";
/// The overcommit phase's clones.
pub(crate) const DEMO_OC_CLONES: usize = 4;
/// The overcommit phase's parent workload.
pub(crate) const DEMO_OC_PHASE1: &str = "fill:seed=1:pages=48M";
/// The overcommit phase's per-VM rewrite (the parent's too).
pub(crate) const DEMO_OC_PHASE2: &str = "fill:seed=2:pages=8M:stride=8M";
/// What the overcommit phase's VMs touch: 48 MiB shared plus 8 MiB private each.
pub(crate) const DEMO_OC_TOUCHED: &str = "88 MiB";
/// The overcommit phase's host memory (the frame pool).
pub(crate) const DEMO_OC_HOST: &str = "44M";
/// `vmm demo`'s guest RAM.
pub(crate) const DEMO_MEM: &str = "256M";
/// `vmm demo`'s vCPUs.
pub(crate) const DEMO_VCPUS: u32 = 2;
/// `vmm demo`'s first phase: each vCPU fills 96 of its 127.5 MiB.
pub(crate) const DEMO_PHASE1: &str = "fill:seed=1:pages=96M";
/// `vmm demo`'s second phase: every VM rewrites its own 4 MiB per vCPU (the parent too),
/// clone 1's child another.
pub(crate) const DEMO_PHASE2: &str = "fill:seed=2:pages=4M:stride=4M";

/// Runs the experiment. The report is there whenever anything ran (also when it then
/// failed: with the error in it); the error says why it stopped early.
pub(crate) fn cmd_fork(p: &ForkParams<'_>) -> (Option<ForkReport>, Option<CliError>) {
    let started = Instant::now();
    let pl = match check(p) {
        Ok(pl) => pl,
        Err(e) => return (None, Some(e)),
    };
    let common = p.common;
    let extra = usize::from(p.grandchild);
    // Every VM of phase 2 copies what it writes, the parent too (its pages are shared
    // with the clones after the fork).
    let copies = (p.clones + extra + 1) as u64;
    let prepared = fork_need(pl.mem, copies, pl.per_clone).and_then(|need| {
        let bytes = pool_bytes(common, default_pool(need)?, need)?;
        let touched = touched_bytes(&pl.plan1, pl.mem)?
            .saturating_add(copies.saturating_mul(pl.per_clone).saturating_mul(PAGE));
        let mm = manager(common, bytes, need)?;
        check_host_memory(touched.min(bytes))?;
        check_fds(p.clones + extra, common.vcpus)?;
        Ok((bytes, touched, mm, hypervisor()?))
    });
    let (bytes, touched, mm, hv) = match prepared {
        Ok(x) => x,
        Err(e) => return (None, Some(e)),
    };
    // Units of work: the parent made and its phase 1; each clone forked, its phase 2 and
    // its verify (the parent's too).
    let vms = 1 + p.clones + extra;
    let steps1 = pl.plan1.first().map_or(0, Vec::len);
    let steps2 = pl
        .plans2
        .first()
        .and_then(|x| x.first())
        .map_or(0, Vec::len);
    let fb = Feedback::new(
        (1 + steps1 + (vms - 1) + vms * (steps2 + 1)) as u64,
        true,
        p.events,
    );
    let mut cfg_record = Config::new(
        if p.demo { "demo" } else { "fork" },
        common,
        pl.mem,
        bytes,
        &mm,
    );
    cfg_record.clones = Some(p.clones);
    cfg_record.grandchild = p.grandchild;
    cfg_record.shells = p.shells || p.workers > 0;
    cfg_record.workers = p.workers;
    cfg_record.parent = Some(match p.parent {
        vmm::ParentMode::Rebirth => "rebirth",
        vmm::ParentMode::InPlace => "in-place",
    });
    cfg_record.phase1 = Some(p.phase1.into());
    cfg_record.phase2 = Some(p.phase2.into());
    cfg_record.vcpu_nodes = p.vcpu_nodes.map(<[u16]>::to_vec);
    fb.event("start", json!({ "config": &cfg_record }));
    let pool = mm.pool().clone();
    let mut ex = Experiment::default();
    let fatal = run(p, &pl, &hv, &mm, &fb, &mut ex).err();
    // Every VM's work is over (done, failed, or cut short by Ctrl-C or --timeout): stop
    // them all at once, so that none runs on while the ones before it are dropped.
    for m in &ex.members {
        m.vm.stop();
    }
    fb.finish();
    let rows: Vec<ForkVmReport> = ex
        .members
        .iter()
        .map(|m| m.row(mm.swap_device().is_some()))
        .collect();
    let first_failure = ex
        .members
        .iter()
        .find_map(|m| m.error.as_ref().map(|e| m.named(e)));
    let vm_error = ex.members.iter_mut().find_map(|m| m.error.take());
    let timing = ex.timing.clone().unwrap_or_default();
    let mib = |pages: f64| pages * PAGE as f64 / MIB as f64;
    // A full copy holds what the parent has, resident or swapped out (0 without swap).
    let parent_resident = rows
        .first()
        .map_or(0, |r| r.memory_pages.resident + r.memory_pages.swapped);
    let report = ForkReport {
        config: cfg_record,
        mem_bytes: pl.mem,
        vcpus: common.vcpus,
        clones: p.clones,
        fork_total_ms: timing.total_ns as f64 / 1e6,
        fork_pause_ms: timing.pause_ns as f64 / 1e6,
        fork_save_ms: timing.save_ns as f64 / 1e6,
        fork_rebirth_ms: timing.rebirth_ns as f64 / 1e6,
        fork_per_clone_ms: timing.total_ns as f64 / 1e6 / p.clones as f64,
        grandchild_fork_ms: ex.grandchild_ms,
        shell_ms_per_clone: ex.shell_ms,
        clones_from_shells: timing.from_shells,
        host_mib: pool.resident_bytes().unwrap_or(0) as f64 / MIB as f64,
        swap: super::report::SwapSummary::of(&mm, touched),
        full_copies_mib: mib((parent_resident * rows.len() as u64) as f64),
        pss_total_mib: rows.iter().map(|r| r.memory_mib.pss).sum(),
        live_move: ex.live_move.clone(),
        verified: fatal.is_none()
            && rows.len() == 1 + p.clones + extra
            && rows.iter().all(|r| r.verified),
        vms: rows,
        frames_returned_at_exit: false,
        // In the table's names (`clone 3`, not the manager's `vm6`).
        error: fatal
            .as_ref()
            .map(|e| {
                ex.members.iter().fold(e.to_string(), |t, m| {
                    name_vm(&t, &m.vm.space().id().to_string(), &m.role)
                })
            })
            .or(first_failure),
        elapsed_s: 0.0,
    };
    drop(ex);
    let report = ForkReport {
        frames_returned_at_exit: pool.free_frames() == pool.total_frames(),
        elapsed_s: started.elapsed().as_secs_f64(),
        ..report
    };
    // A VM's own failure (phase 2) decides the status when nothing stopped the whole run;
    // an event stream that could not be written is an error too.
    let error = fatal
        .or(vm_error)
        .or_else(|| fb.write_error().map(CliError::Report));
    (Some(report), error)
}

/// The experiment's steps, recording into `ex` as it goes.
fn run(
    p: &ForkParams<'_>,
    pl: &Plan,
    hv: &vmm::Hypervisor,
    mm: &std::sync::Arc<guestmem::Manager>,
    fb: &Feedback,
    ex: &mut Experiment,
) -> Result<(), CliError> {
    fb.stage("booting the parent VM");
    // Clones inherit the parent's node policy (its frames are theirs until they write)
    // and its home node's CPUs.
    let home = p
        .vcpu_nodes
        .map_or(pl.cfg.home_node, |list| guestmem::NodeId(list[0]));
    let cfg = VmConfig {
        home_node: home,
        home_cpus: super::limits::home_cpus(mm, home),
        vcpu_homes: p.vcpu_nodes.map(|list| super::limits::vcpu_homes(mm, list)),
        ..pl.cfg.clone()
    };
    let parent = ManagedVm::with_policy(hv, &cfg, mm, p.common.policy)?;
    ex.members.push(Member::new(
        "parent".into(),
        MemberVm::Local(parent),
        Model::new(),
        None,
    ));
    fb.vm("parent", "created", None);
    let deadline = Deadline::starting_now(p.common.timeout);
    fb.stage("phase 1 in the parent");
    {
        let m = &mut ex.members[0];
        let r = run_plan(
            m.vm.guest(),
            "parent, phase 1",
            1,
            &pl.plan1,
            &mut m.model,
            deadline,
            &mut m.steps,
        );
        for s in &m.steps {
            fb.step("parent", s);
        }
        r?;
    }
    if p.workers > 0 {
        fork_into_workers(p, pl, hv, mm, fb, ex, &cfg)?;
    } else {
        fork_here(p, pl, hv, fb, ex, &cfg)?;
    }
    fb.stage("phase 2 in the parent and every clone");
    let mover = p.live_move.and_then(|(k, node)| {
        let space = ex.members.get(k)?.vm.space().clone();
        let role = ex.members[k].role.clone();
        Some((role, node, space))
    });
    ex.live_move = phase2(&mut ex.members, &pl.plans2, fb, deadline, mover);
    let reserve = reserve_of(p, pl);
    if p.grandchild {
        // Clone 1 forks again, unless it already failed (then the grandchild is missing
        // from the report, and the verdict says so).
        if let (None, Some(clone1)) = (&ex.members[1].error, ex.members[1].vm.local()) {
            fb.stage("forking clone 1 again");
            let (mut g, t) = clone1.fork(
                hv,
                &ForkOptions {
                    clones: 1,
                    reserve_pages: reserve,
                    parent: vmm::ParentMode::Rebirth,
                },
            )?;
            ex.grandchild_ms = Some(t.total_ns as f64 / 1e6);
            let Some(g) = g.pop() else {
                return Err(CliError::Internal(
                    "forking clone 1 again returned no clone".into(),
                ));
            };
            {
                let who = role(p.clones + 1, p.clones);
                fb.vm(&who, "forked", ex.grandchild_ms);
                let mut m = Member::new(
                    who.clone(),
                    MemberVm::Local(g),
                    ex.members[1].model.clone(),
                    ex.grandchild_ms,
                );
                let r = run_plan(
                    m.vm.guest(),
                    &format!("{who}, phase 2"),
                    2,
                    &pl.plans2[p.clones + 1],
                    &mut m.model,
                    deadline,
                    &mut m.steps,
                );
                for s in &m.steps {
                    fb.step(&who, s);
                }
                if let Err(e) = r {
                    fb.failed(&who, &e.to_string());
                    m.error = Some(e);
                }
                ex.members.push(m);
            }
        }
    }
    if let Some(target) = &p.common.corrupt
        && let Some(m) = ex
            .members
            .iter()
            .find(|m| m.role == *target && m.error.is_none())
    {
        corrupt(m)?;
    }
    fb.stage("verifying every VM");
    verify_all(&mut ex.members, fb, deadline);
    Ok(())
}

/// Pages reserved for each clone's copies: with swap on, reclaim makes room for them and
/// nothing is reserved.
fn reserve_of(p: &ForkParams<'_>, pl: &Plan) -> u64 {
    if p.common.swap_on() { 0 } else { pl.per_clone }
}

fn fork_options(p: &ForkParams<'_>, pl: &Plan) -> ForkOptions {
    ForkOptions {
        clones: p.clones,
        reserve_pages: reserve_of(p, pl),
        parent: p.parent,
    }
}

/// Adds the fork's clones to the experiment.
fn add_clones(
    p: &ForkParams<'_>,
    fb: &Feedback,
    ex: &mut Experiment,
    clones: Vec<MemberVm>,
    timing: vmm::ForkTiming,
) {
    let model = ex.members[0].model.clone();
    for (k, c) in clones.into_iter().enumerate() {
        let ms = timing.clone_ns.get(k).map(|&n| n as f64 / 1e6);
        let who = role(k + 1, p.clones);
        fb.vm(&who, "forked", ms);
        ex.members.push(Member::new(who, c, model.clone(), ms));
    }
    ex.timing = Some(timing);
}

fn parent_of(ex: &Experiment) -> Result<&ManagedVm, CliError> {
    ex.members
        .first()
        .and_then(|m| m.vm.local())
        .ok_or_else(|| CliError::Internal("the parent is not a VM of this process".into()))
}

/// The fork with every clone in this process (with `--shells`, their VMs made before
/// the pause).
fn fork_here(
    p: &ForkParams<'_>,
    pl: &Plan,
    hv: &vmm::Hypervisor,
    fb: &Feedback,
    ex: &mut Experiment,
    cfg: &VmConfig,
) -> Result<(), CliError> {
    // Shells of the parent's shape, home CPUs included: a clone takes only those.
    let shells = ShellPool::new(cfg);
    if p.shells {
        fb.stage(format!("making {} VM shells", p.clones));
        let t = Instant::now();
        // In batches, so that Ctrl-C stops a long fill (10,000 shells take a minute).
        while shells.len() < p.clones {
            if super::feedback::interrupted() {
                return Err(CliError::Interrupted {
                    vm: "parent".into(),
                    step: format!(
                        "making the clones' VM shells ({} of {} made)",
                        shells.len(),
                        p.clones
                    ),
                });
            }
            shells.fill(hv, (shells.len() + 16).min(p.clones))?;
        }
        ex.shell_ms = Some(t.elapsed().as_secs_f64() * 1e3 / p.clones as f64);
    }
    fb.stage(format!("forking into {} clones", p.clones));
    let (clones, timing) = parent_of(ex)?.fork_with(hv, &fork_options(p, pl), Some(&shells))?;
    let clones = clones.into_iter().map(MemberVm::Local).collect();
    add_clones(p, fb, ex, clones, timing);
    Ok(())
}

/// The fork with every clone held by one of `p.workers` worker processes (copies of this
/// program), their VM shells made in all workers at once before the pause.
fn fork_into_workers(
    p: &ForkParams<'_>,
    pl: &Plan,
    hv: &vmm::Hypervisor,
    mm: &std::sync::Arc<guestmem::Manager>,
    fb: &Feedback,
    ex: &mut Experiment,
    cfg: &VmConfig,
) -> Result<(), CliError> {
    fb.stage(format!("starting {} worker processes", p.workers));
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Internal(format!("this program's path, to start workers: {e}")))?;
    // One thread per CPU (at most 4) resolves the workers' faults.
    let threads = guestmem::host::cpu_count().clamp(1, 4);
    let workers = WorkerPool::spawn(&exe, p.workers, mm, threads)?;
    fb.stage(format!(
        "making {} VM shells in {} worker processes",
        p.clones, p.workers
    ));
    let t = Instant::now();
    let shells = workers.shells(cfg, p.clones)?;
    ex.shell_ms = Some(t.elapsed().as_secs_f64() * 1e3 / p.clones as f64);
    ex.workers = Some(workers);
    fb.stage(format!("forking into {} clones", p.clones));
    let r = parent_of(ex)?.fork_remote(hv, &fork_options(p, pl), &shells);
    ex.remote_shells = Some(shells);
    let (clones, timing) = r?;
    let clones = clones.into_iter().map(MemberVm::Remote).collect();
    add_clones(p, fb, ex, clones, timing);
    Ok(())
}

/// `--corrupt` (a test of the verdict itself): flips the bits of one word of the first
/// page whose pattern `m`'s model knows, from the host side, so its final verify must find
/// exactly one bad word.
fn corrupt(m: &Member) -> Result<(), CliError> {
    let Some(first) = m.model.verify_commands().first().map(|c| c.start.gpa()) else {
        return Ok(());
    };
    let Some(vm) = m.vm.local().map(ManagedVm::vm) else {
        return Err(CliError::Internal(format!(
            "--corrupt {}: a VM held by a worker process",
            m.role
        )));
    };
    let word = vm.read_u64(first)?;
    vm.window()
        .write_u64s(first, &[!word])
        .map_err(|e| CliError::Vm(e.into()))
}

/// Runs phase 2 in every VM at once (VM k gets `plans[k]`); a VM's failure (a panic too)
/// is recorded in it, the others go on.
fn phase2(
    members: &mut [Member],
    plans: &[Vec<Vec<Command>>],
    fb: &Feedback,
    deadline: Deadline,
    mover: Option<(String, u16, std::sync::Arc<guestmem::AddressSpace>)>,
) -> Option<LiveMove> {
    let running = std::sync::atomic::AtomicBool::new(true);
    let mut moved = None;
    let outcomes: Vec<Result<(), CliError>> = std::thread::scope(|s| {
        let mv = mover.map(|(role, node, space)| {
            let running = &running;
            s.spawn(move || live_move(&role, node, &space, running))
        });
        let handles: Vec<_> = members
            .iter_mut()
            .zip(plans)
            .map(|(m, plan)| {
                let who = m.role.clone();
                let h = s.spawn(move || {
                    let r = run_plan(
                        m.vm.guest(),
                        &format!("{}, phase 2", m.role),
                        2,
                        plan,
                        &mut m.model,
                        deadline,
                        &mut m.steps,
                    );
                    for st in m.steps.iter().filter(|st| st.phase == 2) {
                        fb.step(&m.role, st);
                    }
                    r
                });
                (who, h)
            })
            .collect();
        let out = handles
            .into_iter()
            .map(|(who, h)| h.join().unwrap_or(Err(CliError::Panicked(who))))
            .collect();
        running.store(false, std::sync::atomic::Ordering::SeqCst);
        moved = mv.and_then(|h| h.join().ok());
        out
    });
    for (m, r) in members.iter_mut().zip(outcomes) {
        if let Err(e) = r {
            fb.failed(&m.role, &e.to_string());
            m.error = Some(e);
        }
    }
    moved
}

/// What the live move of one VM's memory did (see [`ForkParams::live_move`]).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LiveMove {
    pub vm: String,
    pub to_node: u16,
    /// Passes over its memory (the last after phase 2 ended).
    pub passes: u64,
    pub stats: guestmem::MigrateStats,
    pub seconds: f64,
    /// Its resident pages on each node afterwards.
    pub pages_per_node: Vec<u64>,
}

/// Moves `space`'s memory to `node` pass after pass while phase 2 runs, then once more.
fn live_move(
    role: &str,
    node: u16,
    space: &guestmem::AddressSpace,
    running: &std::sync::atomic::AtomicBool,
) -> LiveMove {
    let t = std::time::Instant::now();
    let mut st = guestmem::MigrateStats::default();
    let mut passes = 0;
    loop {
        let last = !running.load(std::sync::atomic::Ordering::SeqCst);
        // A VM that failed or exited has nothing left to move.
        if let Ok(s) = space.migrate(
            guestmem::Gfn(0)..guestmem::Gfn(u64::MAX),
            guestmem::NodeId(node),
            guestmem::MigrateWalk::Shared,
        ) {
            st.add(&s);
        }
        passes += 1;
        if last {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Done moving: the old node's free blocks go back to the host (migration keeps them
    // for reuse while it runs).
    space.manager().return_moved_memory();
    LiveMove {
        vm: role.to_string(),
        to_node: node,
        passes,
        stats: st,
        seconds: t.elapsed().as_secs_f64(),
        pages_per_node: space.pages_per_node(),
    }
}

/// The final verify of every VM that has not failed, all at once.
fn verify_all(members: &mut [Member], fb: &Feedback, deadline: Deadline) {
    let outcomes: Vec<Option<Result<(u64, u64), CliError>>> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .map(|m| {
                (m.error.is_none()).then(|| {
                    let h =
                        s.spawn(move || verify_model(m.vm.guest(), &m.role, &m.model, deadline));
                    (m.role.clone(), h)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.map(|(who, h)| h.join().unwrap_or(Err(CliError::Panicked(who)))))
            .collect()
    });
    for (m, r) in members.iter_mut().zip(outcomes) {
        match r {
            None => {}
            Some(Ok((pages, bad))) => {
                fb.verified(&m.role, pages, bad);
                m.verify = Some((pages, bad));
            }
            Some(Err(e)) => {
                fb.failed(&m.role, &e.to_string());
                m.error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::name_vm;

    #[test]
    fn the_demo_clone_limit_is_what_its_stride_allows() {
        let w2 = super::workload("--phase2", super::DEMO_PHASE2).expect("demo's phase 2");
        let mem = super::guest_mem(super::DEMO_MEM).expect("demo's size");
        assert_eq!(
            super::max_clones(&w2, mem, super::DEMO_VCPUS, 1),
            Some(super::DEMO_MAX_CLONES)
        );
    }

    #[test]
    fn the_managers_vm_names_become_the_reports() {
        assert_eq!(
            name_vm("vm6 needs a frame (vm6): vm61 too", "vm6", "clone 3"),
            "clone 3 needs a frame (clone 3): vm61 too"
        );
    }
}
