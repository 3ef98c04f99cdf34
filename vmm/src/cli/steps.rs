//! Turning a workload into each vCPU's guest commands and running them step by step on
//! every vCPU of a VM at once, against the run's deadline (`--timeout`), recording what
//! each page holds so the VM can be verified afterwards.

use std::time::{Duration, Instant};

use guestmem::types::Gfn;
use vmm::guest::DATA_START;
use vmm::worker::{RemoteVm, WorkerError};
use vmm::workload::{Model, Placement, Workload, op_name};
use vmm::{CmdResult, Command, Op, VcpuError, Vm};

use super::error::CliError;
use super::feedback::interrupted;
use super::limits::PAGE;

/// A workload from `flag`'s text.
pub(crate) fn workload(flag: &str, s: &str) -> Result<Workload, CliError> {
    s.parse().map_err(|source| CliError::Workload {
        given: Some(format!("{flag} {s:?}")),
        source,
    })
}

/// Pages per vCPU slice of a guest of `mem` bytes with `vcpus` vCPUs.
fn slice_pages(mem: u64, vcpus: u32) -> u64 {
    (mem - DATA_START) / PAGE / u64::from(vcpus)
}

/// Each vCPU's commands for `w` (seeds offset as the WORKLOAD help says).
pub(crate) fn plan(
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
            .map_err(|source| CliError::Workload {
                given: None,
                source,
            })
        })
        .collect()
}

/// Pages a plan may write (fill, random, dirty ranges), checked.
pub(crate) fn written_pages(plan: &[Vec<Command>]) -> Result<u64, CliError> {
    plan.iter()
        .flatten()
        .filter(|c| matches!(c.op, Op::Fill | Op::Random | Op::Dirty))
        .try_fold(0u64, |sum, c| sum.checked_add(c.pages))
        .ok_or_else(|| {
            CliError::Usage(
                "the workload writes more pages than 64 bits count: use fewer steps".into(),
            )
        })
}

/// When the guests' work must be done: `--timeout` from when it started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Option<Instant>,
    timeout: Option<Duration>,
}

impl Deadline {
    /// `timeout` from now (none: wait for ever).
    pub(crate) fn starting_now(timeout: Option<Duration>) -> Deadline {
        Deadline {
            // A timeout too far off to represent is no limit in practice.
            at: timeout.and_then(|t| Instant::now().checked_add(t)),
            timeout,
        }
    }
}

/// How long one wait for a vCPU lasts before Ctrl-C is looked at again.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// What the steps run on: a VM of this process, or one a worker process holds.
pub(crate) trait Guest: Sync {
    /// Its vCPUs.
    fn vcpu_count(&self) -> usize;
    /// Starts `cmd` on vCPU `i`.
    fn submit(&self, i: usize, cmd: Command) -> Result<(), VcpuError>;
    /// Waits for vCPU `i`'s oldest command until `until` ([`VcpuError::Timeout`] then).
    fn wait_until(&self, i: usize, until: Instant) -> Result<CmdResult, VcpuError>;
    /// One wait's length before Ctrl-C and the deadline are looked at again.
    fn slice(&self) -> Duration {
        WAIT_SLICE
    }
}

impl Guest for Vm {
    fn vcpu_count(&self) -> usize {
        self.vcpus().len()
    }
    fn submit(&self, i: usize, cmd: Command) -> Result<(), VcpuError> {
        self.vcpu(i)
            .ok_or(VcpuError::NoSuchVcpu(i as u32))?
            .submit(cmd)
    }
    fn wait_until(&self, i: usize, until: Instant) -> Result<CmdResult, VcpuError> {
        self.vcpu(i)
            .ok_or(VcpuError::NoSuchVcpu(i as u32))?
            .wait_deadline(Some(until))
    }
}

/// A worker answers one wait at a time: short slices, so that a VM whose command is done
/// is not left waiting behind a sibling's long one.
const REMOTE_SLICE: Duration = Duration::from_millis(5);

fn remote_err(i: usize, e: WorkerError) -> VcpuError {
    match e {
        WorkerError::Timeout => VcpuError::Timeout(i as u32),
        e => VcpuError::Remote {
            vcpu: i as u32,
            source: Box::new(e),
        },
    }
}

impl Guest for RemoteVm {
    fn vcpu_count(&self) -> usize {
        self.vcpus() as usize
    }
    fn submit(&self, i: usize, cmd: Command) -> Result<(), VcpuError> {
        RemoteVm::submit(self, i as u32, cmd).map_err(|e| remote_err(i, e))
    }
    fn wait_until(&self, i: usize, until: Instant) -> Result<CmdResult, VcpuError> {
        self.wait(
            i as u32,
            Some(until.saturating_duration_since(Instant::now())),
        )
        .map_err(|e| remote_err(i, e))
    }
    fn slice(&self) -> Duration {
        REMOTE_SLICE
    }
}

impl Deadline {
    /// Waits for vCPU `i`'s command until the deadline, giving up early on Ctrl-C
    /// ([`VcpuError::Timeout`] then, with [`interrupted`] set).
    fn wait(&self, g: &dyn Guest, i: usize) -> Result<CmdResult, VcpuError> {
        loop {
            let slice = Instant::now() + g.slice();
            let until = self.at.map_or(slice, |d| d.min(slice));
            match g.wait_until(i, until) {
                Err(VcpuError::Timeout(i)) => {
                    let late = self.at.is_some_and(|d| Instant::now() >= d);
                    if late || interrupted() {
                        return Err(VcpuError::Timeout(i));
                    }
                }
                r => return r,
            }
        }
    }
}

/// One step's outcome over all vCPUs.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StepReport {
    /// Which phase of a fork experiment (1 before the fork, 2 after); 1 in `vmm run`.
    pub phase: u8,
    /// The op's name in the workload syntax.
    #[serde(serialize_with = "ser_op")]
    pub op: Op,
    pub pages: u64,
    /// Verify: mismatched words; others: 0.
    pub mismatches: u64,
    /// Checksum/touch/random: the guest's sums (wrapping) over the vCPUs, as a hex string
    /// so that JSON readers keep every bit (a 64-bit value is past a double's 2^53).
    #[serde(serialize_with = "ser_hex")]
    pub result: u64,
    pub ms: f64,
}

fn ser_op<S: serde::Serializer>(op: &Op, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(op_name(*op))
}

fn ser_hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

fn step_name(s: usize, op: Op) -> String {
    format!("step {} ({})", s + 1, op_name(op))
}

/// Runs each step on every vCPU at once (vCPU `i` gets `plan[i][step]`), records it in
/// `model` and appends each finished step's report to `out` (so a step that fails leaves
/// the ones before it reported). `who` names the VM in errors.
pub(crate) fn run_plan(
    vm: &dyn Guest,
    who: &str,
    phase: u8,
    plan: &[Vec<Command>],
    model: &mut Model,
    deadline: Deadline,
    out: &mut Vec<StepReport>,
) -> Result<(), CliError> {
    let steps = plan.first().map_or(0, Vec::len);
    for s in 0..steps {
        let op = plan[0][s].op;
        let fail = |e| CliError::from_step(e, who, || step_name(s, op), deadline.timeout);
        let t = Instant::now();
        for (i, cmds) in plan.iter().enumerate().take(vm.vcpu_count()) {
            vm.submit(i, cmds[s]).map_err(fail)?;
        }
        let mut rep = StepReport {
            phase,
            op,
            pages: 0,
            mismatches: 0,
            result: 0,
            ms: 0.0,
        };
        for (i, cmds) in plan.iter().enumerate().take(vm.vcpu_count()) {
            let r: CmdResult = deadline.wait(vm, i).map_err(fail)?;
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
    Ok(())
}

/// Verifies every page whose pattern `model` knows, spreading the commands over the vCPUs;
/// returns (pages checked, mismatched words).
pub(crate) fn verify_model(
    vm: &dyn Guest,
    who: &str,
    model: &Model,
    deadline: Deadline,
) -> Result<(u64, u64), CliError> {
    let cmds = model.verify_commands();
    let n = vm.vcpu_count().max(1);
    let fail = |e| CliError::from_step(e, who, || "the final verify".into(), deadline.timeout);
    let (mut pages, mut bad) = (0, 0);
    for chunk in cmds.chunks(n) {
        for (i, c) in chunk.iter().enumerate() {
            vm.submit(i, *c).map_err(fail)?;
        }
        for (i, c) in chunk.iter().enumerate() {
            bad += deadline.wait(vm, i).map_err(fail)?.mismatches();
            pages += c.pages;
        }
    }
    Ok((pages, bad))
}
