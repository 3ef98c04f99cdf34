//! `vmm run`: launch VMs on one frame pool, run the workload in each at once, report.

use vmm::workload::Model;
use vmm::{ManagedVm, VmConfig};

use super::args::Common;
use super::error::CliError;
use super::limits::{
    PAGE, check_cpu, check_vcpus, default_pool, guest_mem, hypervisor, manager, pool_bytes,
    run_need,
};
use super::report::{RunReport, VmRunReport};
use super::steps::{Deadline, StepReport, plan, run_plan, workload};

pub(crate) fn cmd_run(common: &Common, vms: u32, w: &str) -> Result<RunReport, CliError> {
    let mem = guest_mem(&common.mem)?;
    check_vcpus(common.vcpus)?;
    if vms == 0 || vms > 1000 {
        return Err(CliError::Usage("--vms must be between 1 and 1000".into()));
    }
    check_cpu(common.cpu)?;
    let w = workload("--workload", w)?;
    let plans = (0..vms)
        .map(|v| plan(&w, mem, common.vcpus, 1000 * u64::from(v), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let total = run_need(mem, vms)?;
    let bytes = pool_bytes(common, default_pool(total)?, total)?;
    let mm = manager(common, bytes)?;
    let hv = hypervisor()?;
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
    if open.saturating_add(need + 16) > limit {
        return Err(CliError::Host(format!(
            "{vms} VMs need about {need} file descriptors and {open} are open, but the open-file limit is {limit}: raise it (ulimit -n, or LimitNOFILE) or run fewer VMs"
        )));
    }
    let machines = (0..vms)
        .map(|_| ManagedVm::new(&hv, &cfg, &mm))
        .collect::<Result<Vec<_>, _>>()?;
    let deadline = Deadline::starting_now(common.timeout);
    let results: Vec<Result<(Vec<StepReport>, u64), CliError>> = std::thread::scope(|s| {
        let handles: Vec<_> = machines
            .iter()
            .zip(&plans)
            .enumerate()
            .map(|(i, (m, p))| {
                s.spawn(move || {
                    let mut model = Model::new();
                    let steps = run_plan(m.vm(), &format!("VM {i}"), p, &mut model, deadline)?;
                    let bad = steps.iter().map(|r| r.mismatches).sum();
                    Ok((steps, bad))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Panicked(format!("VM {i}"))))
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
