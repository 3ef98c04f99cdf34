//! `vmm run`: launch VMs on one frame pool, run the workload in each at once, report.
//!
//! Every VM runs to its end even when another fails: a VM's failure is its row's error,
//! the others' results are reported beside it, and the exit status is the failure's.

use serde_json::json;
use vmm::workload::Model;
use vmm::{ManagedVm, VmConfig};

use super::args::Common;
use super::error::CliError;
use super::feedback::Feedback;
use super::limits::{
    PAGE, check_cpu, check_fds, check_host_memory, check_nodes, check_vcpus, default_pool,
    guest_mem, hypervisor, manager, pool_bytes, run_need, touched_bytes,
};
use super::report::{Config, MigrationSummary, RunReport, VmRunReport};
use super::steps::{Deadline, StepReport, plan, run_plan, workload};

/// `vmm run --migrate-to`: where and how to move the VMs' memory while they run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MigrateOpts {
    pub to: u16,
    pub walk: guestmem::MigrateWalk,
    /// MiB per second at most.
    pub rate_mib: Option<u64>,
}

/// Runs `vms` VMs of the workload `w`. The report is there whenever a VM was made (also
/// when one then failed); the error says why the run did not finish.
pub(crate) fn cmd_run(
    common: &Common,
    vms: u32,
    w: &str,
    events: bool,
    migrate: Option<MigrateOpts>,
    numa_balance_ms: Option<u64>,
    vcpu_nodes: Option<&[u16]>,
) -> (Option<RunReport>, Option<CliError>) {
    let prepared = (|| {
        let mem = guest_mem(&common.mem)?;
        check_vcpus(common.vcpus)?;
        check_nodes(common)?;
        if let Some(list) = vcpu_nodes {
            super::limits::check_vcpu_nodes(list, common.nodes)?;
        }
        if let Some(m) = migrate {
            if usize::from(m.to) >= common.nodes {
                return Err(CliError::Usage(format!(
                    "--migrate-to {}: the pool has {} node(s), numbered from 0 (give --nodes {} or more)",
                    m.to,
                    common.nodes,
                    m.to + 1
                )));
            }
            if m.rate_mib == Some(0) {
                return Err(CliError::Usage(
                    "--migrate-rate must be at least 1 MiB per second (leave it out for no limit)"
                        .into(),
                ));
            }
        }
        if let Some(ms) = numa_balance_ms {
            if ms == 0 || ms > 60_000 {
                return Err(CliError::Usage(format!(
                    "--numa-balance {ms}: the first scan period must be 1 to 60000 ms"
                )));
            }
        }
        if vms == 0 || vms > 1000 {
            return Err(CliError::Usage("--vms must be between 1 and 1000".into()));
        }
        check_cpu(common.cpu)?;
        if common.corrupt.is_some() {
            return Err(CliError::Usage(
                "--corrupt is for fork and demo (run has no final verify: give a verify step \
                 with another seed instead)"
                    .into(),
            ));
        }
        let parsed = workload("--workload", w)?;
        if parsed.has_stride() {
            return Err(CliError::Usage(format!(
                "--workload {w:?}: stride applies only to `vmm fork --phase2` (it gives each VM \
                 of a fork its own range); drop it"
            )));
        }
        let plans = (0..vms)
            .map(|v| plan(&parsed, mem, common.vcpus, 1000 * u64::from(v), 0))
            .collect::<Result<Vec<_>, _>>()?;
        let total = run_need(mem, vms)?;
        let bytes = pool_bytes(common, default_pool(total)?, total)?;
        let touched = plans.iter().try_fold(0u64, |sum, p| {
            touched_bytes(p, mem).map(|t| sum.saturating_add(t))
        })?;
        let mm = manager(common, bytes, total)?;
        check_host_memory(touched.min(bytes))?;
        check_fds(vms as usize, common.vcpus)?;
        let hv = hypervisor()?;
        Ok((mem, plans, bytes, touched, mm, hv))
    })();
    let (mem, plans, bytes, touched, mm, hv) = match prepared {
        Ok(x) => x,
        Err(e) => return (None, Some(e)),
    };
    let mut config = Config::new("run", common, mem, bytes, &mm);
    config.vms = Some(vms);
    config.workload = Some(w.into());
    config.vcpu_nodes = vcpu_nodes.map(<[u16]>::to_vec);
    let steps = plans.first().and_then(|p| p.first()).map_or(0, Vec::len);
    let fb = Feedback::new(u64::from(vms) * (1 + steps as u64), true, events);
    fb.event("start", json!({ "config": &config }));
    let pool = mm.pool().clone();
    let cfg = VmConfig {
        cpu: common.cpu,
        ..VmConfig::new(mem, common.vcpus)
    };
    fb.stage(format!("creating {vms} VM(s)"));
    let mut machines = Vec::new();
    let mut fatal = None;
    for i in 0..vms {
        // VM k's vCPUs live on node k mod --nodes (its first-touch node), or each on its
        // --vcpu-nodes entry (the VM's home is the first).
        let home = match vcpu_nodes {
            Some(list) => guestmem::NodeId(list[0]),
            None => guestmem::NodeId((i as usize % common.nodes) as u16),
        };
        let cfg = VmConfig {
            home_node: home,
            home_cpus: super::limits::home_cpus(&mm, home),
            vcpu_homes: vcpu_nodes.map(|list| super::limits::vcpu_homes(&mm, list)),
            ..cfg.clone()
        };
        // The boot region the VMM writes into a new VM is first touched by this thread.
        guestmem::set_home_node(cfg.home_node);
        let made = ManagedVm::with_policy(&hv, &cfg, &mm, common.policy);
        guestmem::set_home_node(guestmem::NodeId(0));
        match made {
            Ok(m) => {
                fb.vm(&format!("VM {i}"), "created", None);
                machines.push(m);
            }
            Err(e) => {
                fatal = Some(CliError::from(e));
                break;
            }
        }
    }
    let balancer = match numa_balance_ms.map(|ms| {
        guestmem::Balancer::start(
            &mm,
            guestmem::BalanceConfig {
                period_min: std::time::Duration::from_millis(ms),
                period_max: std::time::Duration::from_secs(60)
                    .max(std::time::Duration::from_millis(ms)),
                ..guestmem::BalanceConfig::default()
            },
        )
    }) {
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            fatal = fatal.or(Some(CliError::Usage(format!(
                "--numa-balance: cannot start the balancer thread: {e}"
            ))));
            None
        }
        None => None,
    };
    let deadline = Deadline::starting_now(common.timeout);
    let mut results: Vec<(Vec<StepReport>, Option<CliError>)> = Vec::new();
    let running = std::sync::atomic::AtomicUsize::new(machines.len());
    let mut migration = None;
    if fatal.is_none() {
        fb.stage("running the workload in every VM");
        results = std::thread::scope(|s| {
            let mover = migrate.map(|m| {
                let (machines, running, fb) = (&machines, &running, &fb);
                s.spawn(move || move_memory(machines, mem, m, running, fb))
            });
            let handles: Vec<_> = machines
                .iter()
                .zip(&plans)
                .enumerate()
                .map(|(i, (m, p))| {
                    let (fb, running) = (&fb, &running);
                    s.spawn(move || {
                        let who = format!("VM {i}");
                        let mut model = Model::new();
                        let mut steps = Vec::new();
                        let r = run_plan(m.vm(), &who, 1, p, &mut model, deadline, &mut steps);
                        for st in &steps {
                            fb.step(&who, st);
                        }
                        if let Err(e) = &r {
                            fb.failed(&who, &e.to_string());
                        }
                        running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        (steps, r.err())
                    })
                })
                .collect();
            let results = handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| {
                        (Vec::new(), Some(CliError::Panicked(format!("VM {i}"))))
                    })
                })
                .collect();
            // A panicking VM thread may not have counted itself out.
            running.store(0, std::sync::atomic::Ordering::SeqCst);
            migration = mover.and_then(|h| h.join().ok());
            results
        });
    }
    // Every VM's work is over (done, failed, or cut short): stop them all at once, so
    // that none runs on while the ones before it are dropped.
    for m in &machines {
        m.vm().stop();
    }
    fb.finish();
    let numa_balance = balancer.map(|b| {
        let s = b.stats();
        drop(b);
        s
    });
    let mut reports = Vec::new();
    let mut vm_error = None;
    for (i, m) in machines.iter().enumerate() {
        let (steps, error) = results.get_mut(i).map(std::mem::take).unwrap_or_default();
        // A VM made before the run stopped (another VM could not be made) never ran.
        let text = error
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| fatal.as_ref().map(|f| format!("not run: {f}")));
        let bad = steps.iter().map(|r| r.mismatches).sum::<u64>();
        let ran_all = text.is_none() && steps.len() == plans[i].first().map_or(0, Vec::len);
        let memory = m.memory();
        reports.push(VmRunReport {
            vm: i as u32,
            steps,
            faults: m.fault_counts(),
            counters: m.counters(),
            memory_pages: memory,
            memory_mib: memory.into(),
            window_host_mappings: m.vm().window().host_mappings(),
            pages_per_node: m.space().pages_per_node(),
            mismatches: bad,
            error: text,
            verified: ran_all && bad == 0,
        });
        if vm_error.is_none() {
            vm_error = error;
        }
    }
    let host_resident_bytes = pool.resident_bytes().ok();
    drop(machines);
    let error = fatal
        .or(vm_error)
        .or_else(|| fb.write_error().map(CliError::Report));
    let report = RunReport {
        config,
        mem_bytes: mem,
        vcpus: common.vcpus,
        verified: error.is_none()
            && reports.len() == vms as usize
            && reports.iter().all(|r| r.verified),
        vms: reports,
        pool_bytes: pool.total_frames() * PAGE,
        host_resident_bytes,
        swap: super::report::SwapSummary::of(&mm, touched),
        migration,
        numa_balance,
        frames_returned_at_exit: pool.free_frames() == pool.total_frames(),
        error: error.as_ref().map(ToString::to_string),
    };
    (Some(report), error)
}

/// The `--migrate-to` thread: moves every VM's memory to the node, 2 MiB at a time, pass
/// after pass while a VM still runs (each pass takes the pages placed since), then once
/// more; sleeps as needed to stay under the rate.
fn move_memory(
    machines: &[ManagedVm],
    mem: u64,
    m: MigrateOpts,
    running: &std::sync::atomic::AtomicUsize,
    fb: &Feedback,
) -> MigrationSummary {
    use guestmem::{Gfn, MigrateStats, NodeId};
    let chunk = guestmem::MIGRATE_RUN as u64;
    let pages = mem / PAGE;
    let mut st = MigrateStats::default();
    let mut busy = std::time::Duration::ZERO;
    let start = std::time::Instant::now();
    let mut passes = 0;
    loop {
        let last = running.load(std::sync::atomic::Ordering::SeqCst) == 0;
        for vm in machines {
            let mut at = 0;
            while at < pages {
                let t = std::time::Instant::now();
                // An exited or failed VM has nothing left to move.
                if let Ok(s) =
                    vm.space()
                        .migrate(Gfn(at)..Gfn((at + chunk).min(pages)), NodeId(m.to), m.walk)
                {
                    st.add(&s);
                }
                busy += t.elapsed();
                at += chunk;
                if let Some(rate) = m.rate_mib {
                    let due = std::time::Duration::from_secs_f64(
                        (st.pages * PAGE) as f64 / (rate << 20) as f64,
                    );
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        passes += 1;
        // Progress: the bar's message on a terminal, a `migrate` event with --events.
        let mib = (st.pages * PAGE) as f64 / (1 << 20) as f64;
        fb.note(format!(
            "moving memory to node {}: pass {passes}, {mib:.1} MiB moved",
            m.to
        ));
        fb.event(
            "migrate",
            json!({ "pass": passes, "to_node": m.to, "pages": st.pages, "runs": st.runs }),
        );
        if last {
            break;
        }
        std::thread::yield_now();
    }
    // Done moving: the old nodes' free blocks go back to the host (migration keeps them
    // for reuse while it runs).
    if let Some(vm) = machines.first() {
        vm.space().manager().return_moved_memory();
    }
    MigrationSummary {
        to_node: m.to,
        walk: m.walk,
        passes,
        stats: st,
        seconds: busy.as_secs_f64(),
        gb_per_sec: (st.pages * PAGE) as f64 / busy.as_secs_f64().max(1e-9) / 1e9,
    }
}
