//! `vmm fork` (and `vmm demo`): run a VM, snapshot-fork it into clones, run a second phase
//! in the parent and every clone at once, verify every VM against what it wrote.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vmm::workload::Model;
use vmm::{Command, ForkOptions, ManagedVm, ShellPool, VmConfig};

use super::args::Common;
use super::error::CliError;
use super::limits::{
    MIB, PAGE, check_cpu, check_vcpus, default_pool, fork_need, guest_mem, hypervisor, manager,
    pool_bytes,
};
use super::report::{ForkReport, ForkVmReport};
use super::steps::{Deadline, plan, run_plan, verify_model, workload, written_pages};

pub(crate) struct ForkParams<'a> {
    pub common: &'a Common,
    pub clones: usize,
    pub phase1: &'a str,
    pub phase2: &'a str,
    pub grandchild: bool,
    pub shells: bool,
    pub progress: bool,
}

/// The name of phase 2's VM `k` (0 the parent, then the clones, then the grandchild).
fn role(k: usize, clones: usize) -> String {
    match k {
        0 => "parent".into(),
        k if k <= clones => format!("clone {k}"),
        _ => "clone 1.1".into(),
    }
}

pub(crate) fn cmd_fork(p: &ForkParams<'_>) -> Result<ForkReport, CliError> {
    let started = Instant::now();
    let common = p.common;
    let mem = guest_mem(&common.mem)?;
    check_vcpus(common.vcpus)?;
    if p.clones == 0 || p.clones > 10_000 {
        return Err(CliError::Usage(
            "--clones must be between 1 and 10000".into(),
        ));
    }
    check_cpu(common.cpu)?;
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
    let per_clone = plans2
        .iter()
        .map(|pl| written_pages(pl))
        .try_fold(0, |max, w| w.map(|w| w.max(max)))?;
    let need = fork_need(mem, (p.clones + extra) as u64, per_clone)?;
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
    let bytes = pool_bytes(common, default_pool(need)?, mem)?;
    let mm = manager(common, bytes)?;
    bar.set_message("opening /dev/kvm");
    let hv = hypervisor()?;
    let pool = mm.pool().clone();
    let cfg = VmConfig {
        cpu: common.cpu,
        ..VmConfig::new(mem, vcpus)
    };
    bar.set_message("booting the parent VM");
    let parent = ManagedVm::new(&hv, &cfg, &mm)?;
    let deadline = Deadline::starting_now(common.timeout);
    bar.inc(1);
    bar.set_message("phase 1 in the parent");
    let mut parent_model = Model::new();
    let steps1 = run_plan(
        parent.vm(),
        "parent, phase 1",
        &plan1,
        &mut parent_model,
        deadline,
    )?;
    let bad1: u64 = steps1.iter().map(|s| s.mismatches).sum();
    bar.inc(1);
    bar.set_message(format!("forking into {} clones", p.clones));
    let opts = ForkOptions {
        clones: p.clones,
        reserve_pages: per_clone,
    };
    let mut shell_ms = None;
    let shells = ShellPool::new(&cfg);
    if p.shells {
        bar.set_message(format!("making {} VM shells", p.clones));
        let t = Instant::now();
        shells.fill(&hv, p.clones)?;
        shell_ms = Some(t.elapsed().as_secs_f64() * 1e3 / p.clones as f64);
        bar.set_message(format!("forking into {} clones", p.clones));
    }
    let (clones, timing) = parent.fork_with(&hv, &opts, Some(&shells))?;
    bar.inc(1);
    // Phase 2 everywhere at once (the parent too: it keeps running).
    bar.set_message("phase 2 in the parent and every clone");
    let mut models = vec![parent_model.clone(); p.clones + 1];
    models[0] = parent_model;
    let mut vms: Vec<&ManagedVm> = std::iter::once(&parent).chain(clones.iter()).collect();
    run_phase2(&vms, &plans2, &mut models, &bar, deadline)?;
    let mut grandchild = None;
    let mut grandchild_ms = None;
    if p.grandchild {
        bar.set_message("forking clone 1 again");
        let (mut g, t) = clones[0].fork(
            &hv,
            &ForkOptions {
                clones: 1,
                reserve_pages: per_clone,
            },
        )?;
        grandchild_ms = Some(t.total_ns as f64 / 1e6);
        grandchild = g.pop();
        bar.inc(1);
        if let Some(g) = &grandchild {
            let mut m = models[1].clone();
            let who = format!("{}, phase 2", role(p.clones + 1, p.clones));
            run_plan(g.vm(), &who, &plans2[p.clones + 1], &mut m, deadline)?;
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
            .enumerate()
            .map(|(k, (vm, model))| {
                let bar = bar.clone();
                s.spawn(move || {
                    let r = verify_model(vm.vm(), &role(k, p.clones), model, deadline);
                    bar.inc(1);
                    r
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(k, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Panicked(role(k, p.clones))))
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
            role: role(k, p.clones),
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
    deadline: Deadline,
) -> Result<(), CliError> {
    let clones = vms.len() - 1;
    std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .zip(plans)
            .zip(models.iter_mut())
            .enumerate()
            .map(|(k, ((vm, plan), model))| {
                let bar = bar.clone();
                s.spawn(move || {
                    let who = format!("{}, phase 2", role(k, clones));
                    let r = run_plan(vm.vm(), &who, plan, model, deadline).map(|_| ());
                    bar.inc(1);
                    r
                })
            })
            .collect();
        hs.into_iter().enumerate().try_for_each(|(k, h)| {
            h.join()
                .unwrap_or_else(|_| Err(CliError::Panicked(role(k, clones))))
        })
    })
}
