//! The server's VMs: a table from API id to [`VmEntry`], the frame pools the VMs run on
//! (one [`Manager`] per allocator/rmap pair, made on first use), and the operations the
//! API offers on them. Every operation checks its input and the VM's state before it
//! changes anything, so a refused request leaves everything as it was; a guest that fails
//! marks its VM failed and nothing else.
//!
//! Lock order (each lock is released before the next line up is taken):
//!
//! ```text
//! VmEntry.machine RwLock (read: every use of the VM; write: destroy, which waits for
//!   |                     the operation in flight)
//!   VmEntry.work Mutex (one operation that drives or changes the VM at a time: run,
//!     |                 verify, fork, pause, resume; it holds the VM's Model)
//!     State.vms RwLock (the table; held only to look up, insert or remove)
//!     State.managers Mutex (the frame pools; held to find or make one)
//!       VmEntry.status Mutex (a leaf: what GET shows without waiting for an operation)
//! ```
//!
//! Seeds: every VM the server makes uses the workload seeds as given (plus the vCPU
//! index), with no per-VM offset, so that `verify:seed=N` in a clone checks what
//! `fill:seed=N` wrote in its parent before the fork.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, TryLockError};
use std::time::Duration;

use clap::ValueEnum;
use guestmem::space::CounterSnapshot;
use guestmem::{Manager, MemoryUsage};
use vmm::workload::Model;
use vmm::{FaultCounts, ForkOptions, Hypervisor, ManagedVm, VmConfig};

use super::super::args::{AllocatorArg, Common, RmapArg};
use super::super::error::CliError;
use super::super::limits::{MIB, PAGE, check_vcpus, guest_mem, manager};
use super::super::report::MemMib;
use super::super::steps::{Deadline, StepReport, plan, run_plan, verify_model, workload};

/// The number the API gives a VM (`/vms/{id}`): counted from 1, never reused while the
/// server runs. Not guestmem's `VmId` (an address space's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub(crate) struct ApiId(pub u64);

impl std::fmt::Display for ApiId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {}", self.0)
    }
}

/// What a VM is doing, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum VmState {
    /// Its vCPUs take commands.
    Running,
    /// Paused by `POST /vms/{id}/pause`: no command runs until `resume`.
    Paused,
    /// Its guest failed or timed out: it can only be shown and destroyed.
    Failed,
}

/// How long `DELETE` waits for an operation in flight on the VM before it answers 409.
const DESTROY_WAIT: Duration = Duration::from_secs(2);

/// Why an operation was refused or failed; each variant has its HTTP status
/// ([`OpError::status`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// No VM has this id (or it was destroyed) (404).
    #[error("there is no {0} (GET /vms lists the VMs)")]
    NoVm(ApiId),
    /// The request asks for something the VM's state does not allow (409).
    #[error("{0}")]
    Conflict(String),
    /// The request does not fit this server (400).
    #[error("{0}")]
    Refused(String),
    /// Checking or carrying out the operation failed (status by variant, see
    /// [`OpError::status`]).
    #[error(transparent)]
    Cli(#[from] CliError),
}

impl OpError {
    /// The HTTP status: 4xx when the request was refused and nothing changed, 503 for a
    /// host limit, 504 for a guest past its timeout, 500 for a guest or VMM failure.
    pub(crate) fn status(&self) -> u16 {
        match self {
            OpError::NoVm(_) => 404,
            OpError::Conflict(_) => 409,
            OpError::Refused(_) => 400,
            OpError::Cli(e) => match e {
                CliError::Usage(_) | CliError::Workload { .. } | CliError::PoolTooLarge { .. } => {
                    400
                }
                CliError::Host(_) | CliError::Kvm(_) | CliError::Pool { .. } => 503,
                CliError::TimedOut { .. } => 504,
                // Exit status 2 is a host limit the user can raise.
                e if e.code() == 2 => 503,
                _ => 500,
            },
        }
    }
}

/// What a VM was made with; fixed for its life.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct VmSpec {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The frame allocator design of its pool.
    pub allocator: String,
    /// The reverse-map design of its manager.
    pub rmap: String,
    /// Each vCPU's home node (`vcpu_nodes` at creation; forks inherit it).
    pub vcpu_nodes: Option<Vec<u16>>,
    /// The VM it was forked from, if any.
    pub parent: Option<ApiId>,
}

/// What `GET` shows without waiting for the VM's operation in flight.
#[derive(Debug, Clone)]
struct Status {
    state: VmState,
    /// Why it failed.
    error: Option<String>,
    /// Set by destroy before it waits: operations still queued on the VM give up.
    destroyed: bool,
    /// The operation in flight, if any.
    busy: Option<&'static str>,
    /// Pages whose pattern the VM's model knows (what `verify` checks).
    known_pages: u64,
}

/// The VM's model of its memory, under [`VmEntry::work`].
#[derive(Debug)]
struct Work {
    model: Model,
}

/// One VM of the table.
#[derive(Debug)]
pub(crate) struct VmEntry {
    id: ApiId,
    spec: VmSpec,
    /// None once destroyed. Read: any use; write: destroy.
    machine: RwLock<Option<ManagedVm>>,
    /// Serialises the operations that drive the guest or change the VM.
    work: Mutex<Work>,
    /// A leaf lock.
    status: Mutex<Status>,
}

/// A VM as the API shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct VmView {
    /// The API id.
    pub id: ApiId,
    /// Running, paused or failed.
    pub state: VmState,
    /// Why it failed.
    pub error: Option<String>,
    /// The operation in flight (run, verify, fork, pause, resume), if any.
    pub busy: Option<&'static str>,
    /// What it was made with.
    #[serde(flatten)]
    pub spec: VmSpec,
    /// Memory in pages: resident, shared, private, PSS.
    pub memory_pages: MemoryUsage,
    /// The same in MiB.
    pub memory_mib: MemMib,
    /// Zero fills, copy-on-write copies and reuses, ...
    pub counters: CounterSnapshot,
    /// Guest faults resolved, by kind.
    pub faults: FaultCounts,
    /// Pages whose pattern the VM's model knows (what `POST /vms/{id}/verify` checks).
    pub known_pages: u64,
    /// Resident pages on each node of its pool.
    pub pages_per_node: Vec<u64>,
}

/// What `POST /vms/{id}/run` returns.
#[derive(Debug, serde::Serialize)]
pub(crate) struct RunResult {
    /// The VM.
    pub id: ApiId,
    /// Each step over all vCPUs.
    pub steps: Vec<StepReport>,
    /// Mismatched words over every verify step.
    pub mismatches: u64,
    /// No verify step found a mismatch.
    pub verified: bool,
}

/// What `POST /vms/{id}/verify` returns.
#[derive(Debug, serde::Serialize)]
pub(crate) struct VerifyResult {
    /// The VM.
    pub id: ApiId,
    /// Pages checked: every page whose pattern the VM's model knows.
    pub pages_verified: u64,
    /// Mismatched words.
    pub mismatches: u64,
    /// No mismatch.
    pub verified: bool,
}

/// What `POST /vms/{id}/fork` returns.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ForkResult {
    /// The parent.
    pub parent: ApiId,
    /// The clones' ids.
    pub clones: Vec<ApiId>,
    /// Pause to the last clone running, ms.
    pub fork_ms: f64,
    /// Each clone's share (address-space fork, VM, vCPU state), ms.
    pub clone_ms: Vec<f64>,
}

/// A frame pool of the server, as `GET /version` shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct PoolView {
    /// Allocator design.
    pub allocator: String,
    /// Reverse-map design.
    pub rmap: String,
    /// Frames in the pool, MiB.
    pub total_mib: f64,
    /// Frames free, MiB.
    pub free_mib: f64,
    /// Host memory the pool's frames hold, MiB (when the host says).
    pub host_resident_mib: Option<f64>,
}

/// What a create asks for, checked by [`State::create`].
#[derive(Debug, Clone)]
pub(crate) struct CreateSpec {
    /// `--mem` text (`64M`).
    pub mem: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Allocator name (`magazine`, `percpu`, `global`).
    pub allocator: String,
    /// Rmap name (`chain`, `flat`).
    pub rmap: String,
    /// Each vCPU's home node.
    pub vcpu_nodes: Option<Vec<u16>>,
}

/// How the server was started.
#[derive(Debug, Clone)]
pub(crate) struct StateConfig {
    /// `--pool` text, the size of each frame pool.
    pub pool: String,
    /// Its bytes.
    pub pool_bytes: u64,
    /// CPU to pin every VM's threads to.
    pub cpu: Option<usize>,
    /// Timeout for runs and verifies that do not give one.
    pub timeout: Option<Duration>,
    /// Memory nodes per pool.
    pub nodes: usize,
}

/// What `POST /vms/{id}/migrate` returns.
#[derive(Debug, serde::Serialize)]
pub(crate) struct MigrateResult {
    pub id: ApiId,
    pub node: u16,
    pub stats: guestmem::MigrateStats,
    pub seconds: f64,
    /// The VM's resident pages on each node afterwards.
    pub pages_per_node: Vec<u64>,
}

/// Everything the server serves.
#[derive(Debug)]
pub(crate) struct State {
    hv: Hypervisor,
    cfg: StateConfig,
    /// Key: (allocator, rmap) names.
    managers: Mutex<BTreeMap<(String, String), Arc<Manager>>>,
    vms: RwLock<BTreeMap<ApiId, Arc<VmEntry>>>,
    next_id: AtomicU64,
}

/// Locks `m`, taking it over if a panicking holder poisoned it (`poisoned` tells).
fn lock<T>(m: &Mutex<T>) -> (MutexGuard<'_, T>, bool) {
    match m.lock() {
        Ok(g) => (g, false),
        Err(e) => {
            m.clear_poison();
            (e.into_inner(), true)
        }
    }
}

/// The clap name of a value (`magazine`, `chain`).
fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Parses `s` as one of `T`'s clap names, or says which there are.
fn parse_value<T: ValueEnum>(what: &str, s: &str) -> Result<T, OpError> {
    T::from_str(s, true).map_err(|_| {
        let names: Vec<String> = T::value_variants().iter().map(value_name).collect();
        OpError::Refused(format!("{what} {s:?}: use one of {}", names.join(", ")))
    })
}

/// `Common` with clap's defaults for every option (so that options added to it later
/// keep their defaults here), then the pool, designs and CPU of a server's VM.
fn common_for(
    cfg: &StateConfig,
    allocator: AllocatorArg,
    rmap: RmapArg,
) -> Result<Common, CliError> {
    use clap::{Args, FromArgMatches};
    let defaults = Common::augment_args(clap::Command::new("serve"))
        .try_get_matches_from(["serve"])
        .and_then(|m| Common::from_arg_matches(&m))
        .map_err(|e| CliError::Usage(format!("the default VM options do not parse: {e}")))?;
    Ok(Common {
        // Each node holds a whole --pool, so a VM can move to any of them.
        pool: Some(if cfg.nodes <= 1 {
            cfg.pool.clone()
        } else {
            cfg.pool_bytes.saturating_mul(cfg.nodes as u64).to_string()
        }),
        nodes: cfg.nodes.max(1),
        allocator,
        rmap,
        cpu: cfg.cpu,
        ..defaults
    })
}

impl VmEntry {
    /// Reads the VM, or [`OpError::NoVm`] once it is destroyed.
    fn machine(&self) -> Result<RwLockReadGuard<'_, Option<ManagedVm>>, OpError> {
        let g = self.machine.read().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(OpError::NoVm(self.id));
        }
        Ok(g)
    }

    fn status(&self) -> Status {
        lock(&self.status).0.clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status).0)
    }

    /// Takes the work lock for `op`, after checking the VM is not destroyed and (with
    /// `need_running`) that it runs. A lock a panicking request poisoned fails the VM.
    fn begin(
        &self,
        op: &'static str,
        need_running: bool,
    ) -> Result<(MutexGuard<'_, Work>, OpGuard<'_>), OpError> {
        let (work, poisoned) = lock(&self.work);
        if poisoned {
            self.set_status(|s| {
                s.state = VmState::Failed;
                s.error = Some(format!(
                    "a request on {} panicked while it held the VM; its state is unknown: \
                     destroy it",
                    self.id
                ));
            });
        }
        let s = self.status();
        if s.destroyed {
            return Err(OpError::NoVm(self.id));
        }
        if need_running {
            match s.state {
                VmState::Running => {}
                VmState::Paused => {
                    return Err(OpError::Conflict(format!(
                        "{} is paused: resume it first (POST /vms/{}/resume)",
                        self.id, self.id.0
                    )));
                }
                VmState::Failed => return Err(self.failed_conflict(&s)),
            }
        }
        self.set_status(|s| s.busy = Some(op));
        Ok((work, OpGuard { entry: self }))
    }

    fn failed_conflict(&self, s: &Status) -> OpError {
        OpError::Conflict(format!(
            "{} failed ({}): it can only be shown and destroyed (DELETE /vms/{})",
            self.id,
            s.error.as_deref().unwrap_or("no reason recorded"),
            self.id.0
        ))
    }

    /// Marks the VM failed with `e`'s message and returns `e`.
    fn fail(&self, e: CliError) -> OpError {
        self.set_status(|s| {
            s.state = VmState::Failed;
            s.error = Some(e.to_string());
        });
        OpError::Cli(e)
    }

    /// As [`VmEntry::fail`], after pausing the VM's vCPUs: a guest still busy past its
    /// timeout stops using the host's CPUs until it is destroyed.
    fn fail_stopped(&self, m: &ManagedVm, e: CliError) -> OpError {
        m.vm().pause();
        self.fail(e)
    }

    fn view(&self, m: &ManagedVm) -> VmView {
        let s = self.status();
        let memory = m.memory();
        VmView {
            id: self.id,
            state: s.state,
            error: s.error,
            busy: s.busy,
            spec: self.spec.clone(),
            memory_pages: memory,
            memory_mib: memory.into(),
            counters: m.counters(),
            faults: m.fault_counts(),
            known_pages: s.known_pages,
            pages_per_node: m.space().pages_per_node(),
        }
    }
}

/// Clears the VM's `busy` mark when an operation ends, however it ends.
struct OpGuard<'a> {
    entry: &'a VmEntry,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.entry.set_status(|s| s.busy = None);
    }
}

impl State {
    /// A server with no VMs yet, on `hv`.
    pub(crate) fn new(hv: Hypervisor, cfg: StateConfig) -> State {
        State {
            hv,
            cfg,
            managers: Mutex::new(BTreeMap::new()),
            vms: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn entry(&self, id: ApiId) -> Result<Arc<VmEntry>, OpError> {
        self.vms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or(OpError::NoVm(id))
    }

    fn insert(&self, spec: VmSpec, m: ManagedVm, model: Model, state: VmState) -> ApiId {
        // Relaxed: the counter only has to hand out distinct numbers.
        let id = ApiId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let known_pages = model.known_pages();
        let entry = Arc::new(VmEntry {
            id,
            spec,
            machine: RwLock::new(Some(m)),
            work: Mutex::new(Work { model }),
            status: Mutex::new(Status {
                state,
                error: None,
                destroyed: false,
                busy: None,
                known_pages,
            }),
        });
        self.vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, entry);
        id
    }

    /// The manager (and frame pool) for this pair of designs, made on first use.
    fn manager(&self, allocator: AllocatorArg, rmap: RmapArg) -> Result<Arc<Manager>, OpError> {
        let key = (value_name(&allocator), value_name(&rmap));
        let (mut managers, _) = lock(&self.managers);
        if let Some(m) = managers.get(&key) {
            return Ok(m.clone());
        }
        let common = common_for(&self.cfg, allocator, rmap)?;
        let m = manager(&common, self.cfg.pool_bytes, self.cfg.pool_bytes)?;
        managers.insert(key, m.clone());
        Ok(m)
    }

    /// `POST /vms`: a new VM running the test guest; nothing is made if any check fails.
    pub(crate) fn create(&self, req: &CreateSpec) -> Result<VmView, OpError> {
        let mem = guest_mem(&req.mem)?;
        check_vcpus(req.vcpus)?;
        let allocator: AllocatorArg = parse_value("allocator", &req.allocator)?;
        let rmap: RmapArg = parse_value("rmap", &req.rmap)?;
        if mem > self.cfg.pool_bytes {
            return Err(OpError::Refused(format!(
                "a VM of {} MiB does not fit this server's frame pools of {} MiB: ask for less \
                 memory or restart `vmm serve` with a bigger --pool",
                mem / MIB,
                self.cfg.pool_bytes / MIB
            )));
        }
        let mm = self.manager(allocator, rmap)?;
        let list = req.vcpu_nodes.as_deref();
        if let Some(list) = list {
            crate::cli::limits::check_vcpu_nodes(list, mm.pool().nodes().len())?;
        }
        let home = list.map_or(guestmem::NodeId(0), |l| guestmem::NodeId(l[0]));
        let cfg = VmConfig {
            cpu: self.cfg.cpu,
            home_node: home,
            home_cpus: crate::cli::limits::home_cpus(&mm, home),
            vcpu_homes: list.map(|l| crate::cli::limits::vcpu_homes(&mm, l)),
            ..VmConfig::new(mem, req.vcpus)
        };
        let m = ManagedVm::new(&self.hv, &cfg, &mm).map_err(CliError::from)?;
        let spec = VmSpec {
            mem_bytes: mem,
            vcpus: req.vcpus,
            allocator: value_name(&allocator),
            rmap: value_name(&rmap),
            vcpu_nodes: req.vcpu_nodes.clone(),
            parent: None,
        };
        let id = self.insert(spec, m, Model::new(), VmState::Running);
        self.show(id)
    }

    /// `GET /vms`: every VM, by id (a VM being destroyed is left out).
    pub(crate) fn list(&self) -> Vec<VmView> {
        let entries: Vec<Arc<VmEntry>> = self
            .vms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        entries
            .iter()
            .filter_map(|e| match e.machine.try_read() {
                Ok(g) => g.as_ref().map(|m| e.view(m)),
                Err(TryLockError::Poisoned(g)) => g.into_inner().as_ref().map(|m| e.view(m)),
                Err(TryLockError::WouldBlock) => None,
            })
            .collect()
    }

    /// `GET /vms/{id}`.
    pub(crate) fn show(&self, id: ApiId) -> Result<VmView, OpError> {
        let e = self.entry(id)?;
        let g = e.machine()?;
        let m = g.as_ref().ok_or(OpError::NoVm(id))?;
        Ok(e.view(m))
    }

    /// `POST /vms/{id}/run`: runs `text` (WORKLOAD syntax) on every vCPU, step by step. A
    /// workload that does not parse or fit is refused before the guest is touched; a
    /// guest that fails or passes the timeout fails the VM.
    pub(crate) fn run(
        &self,
        id: ApiId,
        text: &str,
        timeout: Option<Duration>,
    ) -> Result<RunResult, OpError> {
        let e = self.entry(id)?;
        let w = workload("workload", text)?;
        let p = plan(&w, e.spec.mem_bytes, e.spec.vcpus, 0, 0)?;
        let g = e.machine()?;
        let m = g.as_ref().ok_or(OpError::NoVm(id))?;
        let (mut work, _op) = e.begin("run", true)?;
        let deadline = Deadline::starting_now(timeout.or(self.cfg.timeout));
        let mut model = work.model.clone();
        let mut steps = Vec::new();
        run_plan(
            m.vm(),
            &id.to_string(),
            1,
            &p,
            &mut model,
            deadline,
            &mut steps,
        )
        .map_err(|x| e.fail_stopped(m, x))?;
        e.set_status(|s| s.known_pages = model.known_pages());
        work.model = model;
        let mismatches = steps.iter().map(|s| s.mismatches).sum();
        Ok(RunResult {
            id,
            steps,
            mismatches,
            verified: mismatches == 0,
        })
    }

    /// `POST /vms/{id}/verify`: checks every page whose pattern the VM's model knows
    /// (what its fills wrote, its parent's before a fork included).
    pub(crate) fn verify(
        &self,
        id: ApiId,
        timeout: Option<Duration>,
    ) -> Result<VerifyResult, OpError> {
        let e = self.entry(id)?;
        let g = e.machine()?;
        let m = g.as_ref().ok_or(OpError::NoVm(id))?;
        let (work, _op) = e.begin("verify", true)?;
        let deadline = Deadline::starting_now(timeout.or(self.cfg.timeout));
        let (pages, bad) = verify_model(m.vm(), &id.to_string(), &work.model, deadline)
            .map_err(|x| e.fail_stopped(m, x))?;
        Ok(VerifyResult {
            id,
            pages_verified: pages,
            mismatches: bad,
            verified: bad == 0,
        })
    }

    /// `POST /vms/{id}/migrate`: moves the VM's resident pages in `start .. start +
    /// pages` (default: all of it) to `node`, beside whatever else the VM is doing (a
    /// migrate does not take the VM's turn: its guest keeps running).
    pub(crate) fn migrate(
        &self,
        id: ApiId,
        node: u16,
        start: Option<u64>,
        pages: Option<u64>,
        walk: guestmem::MigrateWalk,
    ) -> Result<MigrateResult, OpError> {
        let e = self.entry(id)?;
        let g = e.machine()?;
        let m = g.as_ref().ok_or(OpError::NoVm(id))?;
        let nodes = m.space().manager().pool().nodes().len();
        if usize::from(node) >= nodes {
            return Err(OpError::Refused(format!(
                "node {node} does not exist: the pool has {nodes} node(s), numbered from 0 \
                 (restart `vmm serve` with --nodes {} or more)",
                node + 1
            )));
        }
        let first = start.unwrap_or(0);
        let end = pages.map_or(u64::MAX, |p| first.saturating_add(p));
        let t = std::time::Instant::now();
        let stats = m
            .space()
            .migrate(
                guestmem::Gfn(first)..guestmem::Gfn(end),
                guestmem::NodeId(node),
                walk,
            )
            .map_err(|x| OpError::Refused(x.to_string()))?;
        let seconds = t.elapsed().as_secs_f64();
        m.space().manager().return_moved_memory();
        Ok(MigrateResult {
            id,
            node,
            stats,
            seconds,
            pages_per_node: m.space().pages_per_node(),
        })
    }

    /// `POST /vms/{id}/pause`.
    pub(crate) fn pause(&self, id: ApiId) -> Result<VmView, OpError> {
        self.set_paused(id, true)
    }

    /// `POST /vms/{id}/resume`.
    pub(crate) fn resume(&self, id: ApiId) -> Result<VmView, OpError> {
        self.set_paused(id, false)
    }

    /// Pauses (`pause`) or resumes the VM; refused (409) if it is already so or failed.
    fn set_paused(&self, id: ApiId, pause: bool) -> Result<VmView, OpError> {
        let e = self.entry(id)?;
        {
            let g = e.machine()?;
            let m = g.as_ref().ok_or(OpError::NoVm(id))?;
            let (_work, _op) = e.begin(if pause { "pause" } else { "resume" }, false)?;
            let s = e.status();
            let (from, to) = if pause {
                (VmState::Running, VmState::Paused)
            } else {
                (VmState::Paused, VmState::Running)
            };
            if s.state == VmState::Failed {
                return Err(e.failed_conflict(&s));
            }
            if s.state != from {
                return Err(OpError::Conflict(if pause {
                    format!("{id} is already paused")
                } else {
                    format!("{id} is not paused")
                }));
            }
            if pause {
                m.vm().pause();
            } else {
                m.vm().resume();
            }
            e.set_status(|s| s.state = to);
        }
        self.show(id)
    }

    /// `POST /vms/{id}/fork`: snapshot-forks the VM (running or paused; it stays as it
    /// was) into `clones` running clones, each with a copy of its model. On failure the
    /// clones made so far are gone and the parent is unchanged.
    pub(crate) fn fork(
        &self,
        id: ApiId,
        clones: usize,
        reserve_pages: u64,
    ) -> Result<ForkResult, OpError> {
        if !(1..=1000).contains(&clones) {
            return Err(OpError::Refused(
                "clones must be between 1 and 1000 per fork".into(),
            ));
        }
        let e = self.entry(id)?;
        let g = e.machine()?;
        let m = g.as_ref().ok_or(OpError::NoVm(id))?;
        let (work, _op) = e.begin("fork", false)?;
        let s = e.status();
        if s.state == VmState::Failed {
            return Err(e.failed_conflict(&s));
        }
        let opts = ForkOptions {
            clones,
            reserve_pages,
            parent: vmm::ParentMode::Rebirth,
        };
        let (made, timing) = m.fork(&self.hv, &opts).map_err(|x| {
            // A fork that fails leaves the parent as it was, unless its guest failed.
            match m.vm().failure() {
                Some(_) => e.fail(CliError::from(x)),
                None => OpError::Cli(CliError::from(x)),
            }
        })?;
        let spec = VmSpec {
            parent: Some(id),
            ..e.spec.clone()
        };
        let ids = made
            .into_iter()
            .map(|c| self.insert(spec.clone(), c, work.model.clone(), VmState::Running))
            .collect();
        Ok(ForkResult {
            parent: id,
            clones: ids,
            fork_ms: timing.total_ns as f64 / 1e6,
            clone_ms: timing.clone_ns.iter().map(|&n| n as f64 / 1e6).collect(),
        })
    }

    /// `DELETE /vms/{id}`: takes the VM out of the table, waits for its operation in
    /// flight, stops it and returns its frames (those no clone shares).
    pub(crate) fn destroy(&self, id: ApiId) -> Result<(), OpError> {
        let e = self
            .vms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or(OpError::NoVm(id))?;
        // Never a blocking write: a waiting writer would queue every later reader of this
        // VM (GET included) behind a run that may not end, until no worker is left.
        let patience = std::time::Instant::now() + DESTROY_WAIT;
        let mut g = loop {
            match e.machine.try_write() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(g)) => break g.into_inner(),
                Err(TryLockError::WouldBlock) if std::time::Instant::now() < patience => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(OpError::Conflict(format!(
                        "{id} is busy with an operation that has not ended in {} s: destroy \
                         it when that ends (GET shows `busy`), or give its runs a timeout",
                        DESTROY_WAIT.as_secs()
                    )));
                }
            }
        };
        self.vms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        e.set_status(|s| s.destroyed = true);
        drop(g.take());
        Ok(())
    }

    /// Destroys every VM that is not busy (at shutdown, after the grace period); returns
    /// how many were left running because an operation still held them.
    pub(crate) fn destroy_all(&self) -> usize {
        let entries: Vec<Arc<VmEntry>> =
            std::mem::take(&mut *self.vms.write().unwrap_or_else(|e| e.into_inner()))
                .into_values()
                .collect();
        let mut left = 0;
        for e in entries {
            e.set_status(|s| s.destroyed = true);
            match e.machine.try_write() {
                Ok(mut g) => drop(g.take()),
                Err(TryLockError::Poisoned(g)) => drop(g.into_inner().take()),
                Err(TryLockError::WouldBlock) => left += 1,
            }
        }
        left
    }

    /// VMs in the table.
    pub(crate) fn vm_count(&self) -> usize {
        self.vms.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The frame pools made so far.
    pub(crate) fn pools(&self) -> Vec<PoolView> {
        let mib = |frames: u64| (frames * PAGE) as f64 / MIB as f64;
        lock(&self.managers)
            .0
            .iter()
            .map(|((a, r), m)| {
                let p = m.pool();
                PoolView {
                    allocator: a.clone(),
                    rmap: r.clone(),
                    total_mib: mib(p.total_frames()),
                    free_mib: mib(p.free_frames()),
                    host_resident_mib: p.resident_bytes().ok().map(|b| b as f64 / MIB as f64),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_names_parse_case_blind_and_unknown_ones_name_the_choices() {
        assert!(matches!(
            parse_value::<AllocatorArg>("allocator", "Magazine"),
            Ok(AllocatorArg::Magazine)
        ));
        let e = parse_value::<RmapArg>("rmap", "tree").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("chain, flat"), "{e}");
    }

    #[test]
    fn errors_map_to_http_statuses_by_variant() {
        assert_eq!(OpError::NoVm(ApiId(3)).status(), 404);
        assert_eq!(OpError::Conflict("paused".into()).status(), 409);
        assert_eq!(OpError::Cli(CliError::Usage("bad".into())).status(), 400);
        assert_eq!(OpError::Cli(CliError::Host("no kvm".into())).status(), 503);
        let late = CliError::TimedOut {
            vm: "VM 1".into(),
            vcpu: 0,
            step: "step 1 (fill)".into(),
            timeout: Duration::from_millis(5),
        };
        assert_eq!(OpError::Cli(late).status(), 504);
        assert_eq!(
            OpError::Cli(CliError::Panicked("VM 1".into())).status(),
            500
        );
    }

    #[test]
    fn a_servers_common_options_keep_their_defaults_and_take_the_designs() {
        let cfg = StateConfig {
            pool: "1G".into(),
            pool_bytes: 1 << 30,
            cpu: None,
            timeout: None,
            nodes: 1,
        };
        let c = common_for(&cfg, AllocatorArg::Global, RmapArg::Flat).unwrap();
        assert_eq!(c.pool.as_deref(), Some("1G"));
        // With two nodes each holds a whole --pool.
        let two = common_for(
            &StateConfig {
                nodes: 2,
                ..cfg.clone()
            },
            AllocatorArg::Global,
            RmapArg::Flat,
        )
        .unwrap();
        assert_eq!((two.pool.as_deref(), two.nodes), (Some("2147483648"), 2));
        assert!(matches!(c.allocator, AllocatorArg::Global));
        assert!(matches!(c.rmap, RmapArg::Flat));
    }
}
