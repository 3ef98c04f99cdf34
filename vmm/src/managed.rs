//! Guests on guestmem-managed memory and their snapshot-fork.
//!
//! [`SpaceResolver`] is the adapter between the VMM's fault handler and the memory
//! manager: guest faults are resolved by guestmem's [`AddressSpace`], which picks the frame
//! and mirrors the mapping into the VM's [`Window`] through
//! `HostMmu` ([`crate::fault::ScaffoldResolver`] is the test stand-in it replaces).
//!
//! [`ManagedVm`] is a [`Vm`] together with its address space, and [`ManagedVm::fork`]
//! is the snapshot-fork of a running VM into N copy-on-write clones:
//!
//! 1. check the limits up front (free frames for the reserve asked for, open files), so
//!    that a fork that cannot complete fails before the parent is touched; [`ManagedVm::fork`]
//!    then makes the clones' VM shells while the parent still runs;
//! 2. pause every vCPU and wait for queued faults ([`Vm::pause`]);
//! 3. save every vCPU's state (pending port I/O completed first);
//! 4. if the parent may have written since its last fork, move it into a fresh KVM VM
//!    with a fresh, all-holes window ([`Vm::rebirth`]): its old mappings (host and KVM)
//!    are destroyed on a background thread, so no page is write-protected on the fork's
//!    path and the cost does not grow with the memory touched;
//! 5. per clone: a new VM whose resolver is `AddressSpace::fork` of the parent's space
//!    (page-table blocks shared copy-on-write, O(blocks)); the parent's window, fresh,
//!    needs nothing (`protect_for_fork` is a no-op on a clean window, so a batch of N
//!    clones protects once); then the clone's vCPUs get the saved state and, if a command
//!    was in flight, continue it at the same instruction;
//! 6. resume the parent.
//!
//! On any error the clones made so far are dropped (their frames go back, their fds
//! close) and the parent resumes as it was.

use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use guestmem::space::CounterSnapshot;
use guestmem::types::Gfn;
use guestmem::{Access, AddressSpace, Manager, MemoryUsage, RegionSpec};

use crate::fault::{FaultCounts, FaultError, FaultKind, FaultResolver};
use crate::vcpu::{VcpuError, VcpuState};
use crate::vm::{Hypervisor, ShellPool, Vm, VmConfig, VmError, open_fds, raise_nofile_limit};
use crate::window::Window;

/// Resolves faults through an [`AddressSpace`] (the space's `HostMmu` must be the VM's
/// window). Dropping it does not exit the space: the owner decides when frames go back.
#[derive(Debug, Clone)]
pub struct SpaceResolver {
    space: Arc<AddressSpace>,
}

impl SpaceResolver {
    /// A resolver for `space`.
    pub fn new(space: Arc<AddressSpace>) -> SpaceResolver {
        SpaceResolver { space }
    }

    /// The address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }
}

impl FaultResolver for SpaceResolver {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        self.resolve_run(gfn, kind).map(|_| ())
    }

    fn resolve_run(&self, gfn: Gfn, kind: FaultKind) -> Result<Range<Gfn>, FaultError> {
        let access = if kind.is_write() {
            Access::Write
        } else {
            Access::Read
        };
        if let FaultKind::Hint { .. } = kind {
            // Not present any more (reclaimed, moved): the woken access faults again.
            self.space.hint_fault(gfn, access)?;
            return Ok(gfn..gfn.offset(1));
        }
        Ok(self.space.handle_fault_run(gfn, access)?.1)
    }
}

/// A snapshot-fork that could not complete. The parent runs on unchanged and every clone
/// made before the error is gone (frames returned, fds closed).
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// Fewer free frames than the reserve asked for.
    #[error(
        "the frame pool has {free} free frames but {clones} clones with a reserve of {reserve} \
         pages each need {need}: give the pool more memory (--pool) or fork fewer clones"
    )]
    PoolExhausted {
        /// Clones asked for.
        clones: usize,
        /// Pages reserved per clone.
        reserve: u64,
        /// Frames needed.
        need: u64,
        /// Frames free.
        free: u64,
    },
    /// Not enough file descriptors for the clones.
    #[error(
        "{clones} clones need about {need} more file descriptors, but {open} of the limit of \
         {limit} are open: raise the hard limit (ulimit -Hn, limits.conf) or fork fewer clones"
    )]
    FileLimit {
        /// Clones asked for.
        clones: usize,
        /// Descriptors needed.
        need: u64,
        /// Descriptors open now.
        open: u64,
        /// The soft limit (already raised to the hard one).
        limit: u64,
    },
    /// Saving the parent's vCPU state failed.
    #[error("saving the parent's vCPU state failed: {0}")]
    Save(#[source] VcpuError),
    /// Creating clone `index` failed.
    #[error("creating clone {} failed: {source}", index + 1)]
    Clone {
        /// Which clone (0-based) of this batch; the message counts from 1, as reports do.
        index: usize,
        /// Why.
        #[source]
        source: VmError,
    },
    /// Loading the saved state into clone `index` failed.
    #[error("restoring clone {}'s vCPU state failed: {source}", index + 1)]
    Restore {
        /// Which clone (0-based; the message counts from 1).
        index: usize,
        /// Why.
        #[source]
        source: VcpuError,
    },
    /// Giving worker-held clone `index` its state failed ([`ManagedVm::fork_remote`]).
    #[error("clone {} in its worker process: {source}", index + 1)]
    Remote {
        /// Which clone (0-based; the message counts from 1).
        index: usize,
        /// Why.
        #[source]
        source: crate::worker::WorkerError,
    },
}

impl ForkError {
    /// Whether the fork was refused or failed on a limit the user can raise (pool,
    /// descriptors, host mappings) rather than on the guest.
    pub fn is_host_limit(&self) -> bool {
        match self {
            ForkError::PoolExhausted { .. } | ForkError::FileLimit { .. } => true,
            ForkError::Clone { source, .. } => source.is_host_limit(),
            ForkError::Save(e) | ForkError::Restore { source: e, .. } => e.is_host_limit(),
            ForkError::Remote { source, .. } => source.is_host_limit(),
        }
    }
}

/// How to fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkOptions {
    /// Clones to make.
    pub clones: usize,
    /// Frames of the pool reserved for each clone's own copies (0: none). Clones share
    /// every page at first and copy on write; each clone gets this many frames that no
    /// other VM's allocation can take, and a fork that cannot reserve them for every
    /// clone is refused before anything is paused.
    pub reserve_pages: u64,
    /// What happens to the parent's own window.
    pub parent: ParentMode,
}

/// How a snapshot-fork keeps the parent from writing the pages it now shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParentMode {
    /// Move the parent into a fresh KVM VM and an empty window (`Vm::rebirth`): the
    /// pause costs almost nothing per GiB, but every page the parent touches afterwards
    /// faults back in (about 1 s per GiB here if it touches all of it).
    #[default]
    Rebirth,
    /// Keep the parent in its VM and window and write-protect the window in place
    /// (`HostMmu::protect_for_fork` without the swap): the pause pays for the
    /// write-protection (about 15 ms per GiB here), and afterwards only the parent's
    /// writes fault (to copy), its reads cost nothing.
    InPlace,
}

impl ForkOptions {
    /// `clones` clones, no reserve.
    pub fn new(clones: usize) -> ForkOptions {
        ForkOptions {
            clones,
            reserve_pages: 0,
            parent: ParentMode::Rebirth,
        }
    }
}

/// How long a fork took (nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ForkTiming {
    /// Pausing the parent's vCPUs (and draining queued faults).
    pub pause_ns: u64,
    /// Saving the parent's vCPU state.
    pub save_ns: u64,
    /// Moving the parent into a fresh VM (0 if its window was clean).
    pub rebirth_ns: u64,
    /// Per clone: address-space fork, VM + vCPU creation, state restore.
    pub clone_ns: Vec<u64>,
    /// Clones whose VM came from the shell pool (the others' VMs were made during the
    /// fork: no shell was ready, or none of the parent's shape).
    pub from_shells: usize,
    /// From the pause to the last clone running (the parent resumes right after).
    pub total_ns: u64,
}

/// File descriptors one VM holds: KVM VM, userfaultfd, two eventfd handles, a vCPU each.
fn fds_per_vm(vcpus: u32) -> u64 {
    4 + u64::from(vcpus)
}

/// A [`Vm`] on guestmem-managed memory with its [`AddressSpace`]; dropping it stops the
/// VM and then exits the space, returning every frame no other VM maps.
#[derive(Debug)]
pub struct ManagedVm {
    // Dropped by hand in Drop, before the space exits.
    vm: ManuallyDrop<Vm>,
    space: Arc<AddressSpace>,
}

impl ManagedVm {
    /// A VM of `cfg.mem_bytes` (one RAM region at gpa 0) on memory managed by `mm`.
    pub fn new(hv: &Hypervisor, cfg: &VmConfig, mm: &Arc<Manager>) -> Result<ManagedVm, VmError> {
        Self::with_policy(hv, cfg, mm, guestmem::NodePolicy::FirstTouch)
    }

    /// [`ManagedVm::new`] with the address space's node policy set before any of its
    /// memory (the boot region the VMM writes first) is placed.
    pub fn with_policy(
        hv: &Hypervisor,
        cfg: &VmConfig,
        mm: &Arc<Manager>,
        policy: guestmem::NodePolicy,
    ) -> Result<ManagedVm, VmError> {
        let regions = [RegionSpec {
            start: Gfn(0),
            pages: cfg.mem_bytes / crate::PAGE_SIZE_U64,
        }];
        Self::build(hv, cfg, |w| {
            let space = mm.create(&regions, w.clone())?;
            space.set_policy(policy)?;
            space.set_home_node(cfg.home_node);
            if cfg.vcpus_span_nodes() {
                // Its window takes hinting faults that name the vCPU (Vm::shell).
                space.record_touches();
            }
            // The boot region holds the guest's page tables, GDT and program: KVM's
            // shadow MMU (on software KVM hosts such as this one) reads and updates the
            // page tables in ways that cannot wait for a userfaultfd fault, so reclaim
            // must never take them away. Forks inherit the lock.
            space.mlock(Gfn(0)..Gfn(crate::guest::DATA_START / crate::PAGE_SIZE_U64))?;
            Ok(space)
        })
    }

    fn build(
        hv: &Hypervisor,
        cfg: &VmConfig,
        make_space: impl FnOnce(&Arc<Window>) -> Result<Arc<AddressSpace>, FaultError>,
    ) -> Result<ManagedVm, VmError> {
        Self::adopt(Vm::shell(hv, cfg)?, make_space)
    }

    /// Gives `shell` (a [`Vm::shell`]) the address space `make_space` builds over its
    /// window. On error the shell is dropped and the space, if built, exited.
    fn adopt(
        shell: Vm,
        make_space: impl FnOnce(&Arc<Window>) -> Result<Arc<AddressSpace>, FaultError>,
    ) -> Result<ManagedVm, VmError> {
        let space = make_space(shell.window())?;
        match shell.attach(Arc::new(SpaceResolver::new(space.clone()))) {
            Ok(()) => Ok(ManagedVm {
                vm: ManuallyDrop::new(shell),
                space,
            }),
            Err(e) => {
                drop(shell);
                space.exit();
                Err(e)
            }
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// Memory use (resident, shared, private, PSS in pages).
    pub fn memory(&self) -> MemoryUsage {
        self.space.memory()
    }

    /// The address space's counters (zero-fill, COW copies and reuses, ...).
    pub fn counters(&self) -> CounterSnapshot {
        self.space.counters()
    }

    /// Faults the VM's handler resolved, by kind.
    pub fn fault_counts(&self) -> FaultCounts {
        self.vm.fault_counts()
    }

    /// Snapshot-forks the running VM into `opts.clones` clones (see the module docs).
    /// Commands in flight continue in the parent and in every clone; the clones' vCPUs
    /// return those results from `wait`.
    ///
    /// The clones' VMs are made as shells first, while the parent still runs, so that the
    /// parent is paused only for the fork itself ([`ManagedVm::fork_with`] with a
    /// [`ShellPool`]; `fork_with(.., None)` makes them inside the pause instead).
    pub fn fork(
        &self,
        hv: &Hypervisor,
        opts: &ForkOptions,
    ) -> Result<(Vec<ManagedVm>, ForkTiming), ForkError> {
        self.check_limits(opts)?;
        let shells = ShellPool::new(self.vm.config());
        shells
            .fill(hv, opts.clones)
            .map_err(|source| ForkError::Clone {
                index: shells.len(),
                source,
            })?;
        self.fork_with(hv, opts, Some(&shells))
    }

    /// As [`ManagedVm::fork`], taking the clones' VMs from `shells` while it has matching
    /// ones (and creating the rest): with enough shells, no KVM VM, vCPU, window or thread
    /// is created on the fork's path. A shell used by a clone that then fails is dropped.
    pub fn fork_with(
        &self,
        hv: &Hypervisor,
        opts: &ForkOptions,
        shells: Option<&ShellPool>,
    ) -> Result<(Vec<ManagedVm>, ForkTiming), ForkError> {
        let ready = shells.map_or(0, ShellPool::len).min(opts.clones);
        self.check_reserve(opts)?;
        // Descriptors only for the clones no shell is ready for.
        self.check_fds(opts.clones - ready)?;
        self.fork_held(hv, opts, |index, states, timing| {
            let fork_space = |w: &Arc<Window>| self.fork_space(w.clone(), opts);
            let clone = match shells.and_then(|p| p.take(&cfg_of(self))) {
                Some(shell) => {
                    timing.from_shells += 1;
                    Self::adopt(shell, fork_space)
                }
                None => Self::build(hv, &cfg_of(self), fork_space),
            }
            .map_err(|source| ForkError::Clone { index, source })?;
            for (v, st) in clone.vm.vcpus().iter().zip(states) {
                v.restore_state(st)
                    .map_err(|source| ForkError::Restore { index, source })?;
            }
            Ok(clone)
        })
    }

    /// Snapshot-forks the running VM into `opts.clones` clones held by worker processes,
    /// taking their VMs from `shells` ([`crate::worker::WorkerPool::shells`], of this
    /// VM's shape); as [`ManagedVm::fork_with`] otherwise. This process creates no VM,
    /// thread or mapping per clone: only the address-space fork and, per clone, one
    /// request to its worker to load the saved vCPU state.
    pub fn fork_remote(
        &self,
        hv: &Hypervisor,
        opts: &ForkOptions,
        shells: &crate::worker::RemoteShells,
    ) -> Result<(Vec<crate::worker::RemoteVm>, ForkTiming), ForkError> {
        let (want, have) = (self.vm.config(), shells.config());
        if want.mem_bytes != have.mem_bytes || want.vcpus != have.vcpus {
            return Err(ForkError::Clone {
                index: 0,
                source: VmError::Config(format!(
                    "the workers' shells have {} bytes and {} vCPUs, the parent {} and {}",
                    have.mem_bytes, have.vcpus, want.mem_bytes, want.vcpus
                )),
            });
        }
        if shells.len() < opts.clones {
            return Err(ForkError::Clone {
                index: shells.len(),
                source: VmError::Config(format!(
                    "{} clones asked for, {} shells ready in the workers: make more first",
                    opts.clones,
                    shells.len()
                )),
            });
        }
        // The clones open no descriptor in this process: only the reserve is checked.
        self.check_reserve(opts)?;
        self.fork_held(hv, opts, |index, states, timing| {
            let clone = shells
                .adopt(|mmu| self.fork_space(mmu, opts))
                .map_err(|e| ForkError::Clone {
                    index,
                    source: VmError::Fault(e),
                })?
                .ok_or(ForkError::Clone {
                    index,
                    source: VmError::Config("the workers' shells ran out".into()),
                })?;
            timing.from_shells += 1;
            clone
                .restore(states)
                .map_err(|source| ForkError::Remote { index, source })?;
            Ok(clone)
        })
    }

    /// The clone's address space: `AddressSpace::fork` of this VM's onto `mmu`, with
    /// the reserve made at the same time (no other VM can take the clone's frames
    /// afterwards; a refusal leaves nothing shared).
    fn fork_space(
        &self,
        mmu: Arc<dyn guestmem::mmu::HostMmu>,
        opts: &ForkOptions,
    ) -> Result<Arc<AddressSpace>, FaultError> {
        crate::failpoint::hit(crate::failpoint::ForkStep::SpaceFork).map_err(|_| {
            guestmem::SpaceError::Rmap {
                vm: self.space.id(),
                source: rmap::RmapError::AllocFailed {
                    what: "an anon_vma",
                },
            }
        })?;
        Ok(self.space.fork_with(
            mmu,
            guestmem::ChildOptions {
                limit: None,
                reserve: opts.reserve_pages,
            },
        )?)
    }

    /// The fork around the clones: one fork of this VM at a time, the parent held (not
    /// paused: no `resume` from another thread can let a vCPU run while its state is
    /// saved or moved), its state saved, the parent moved to a fresh VM if it wrote
    /// since its last fork, then `make` per clone with the saved states, then the
    /// parent resumed.
    fn fork_held<C>(
        &self,
        hv: &Hypervisor,
        opts: &ForkOptions,
        mut make: impl FnMut(usize, &[VcpuState], &mut ForkTiming) -> Result<C, ForkError>,
    ) -> Result<(Vec<C>, ForkTiming), ForkError> {
        let _serial = self.vm.fork_guard();
        let t0 = Instant::now();
        let hold = self.vm.hold();
        let pause_ns = t0.elapsed().as_nanos() as u64;
        let mut retiree = None;
        let r = (|| {
            let (states, mut timing) = self.save_and_move(hv, opts, &mut retiree)?;
            let mut clones = Vec::with_capacity(opts.clones);
            for index in 0..opts.clones {
                let t = Instant::now();
                clones.push(make(index, &states, &mut timing)?);
                timing.clone_ns.push(t.elapsed().as_nanos() as u64);
            }
            Ok((clones, timing))
        })();
        // The default again for the next fork (`ParentMode` is per fork).
        self.vm.window().set_swap_on_fork(true);
        let total_ns = t0.elapsed().as_nanos() as u64;
        drop(hold);
        // The parent's old VM and window go now, in the background.
        drop(retiree);
        let (clones, mut timing) = r?;
        timing.pause_ns = pause_ns;
        timing.total_ns = total_ns;
        Ok((clones, timing))
    }

    fn check_reserve(&self, opts: &ForkOptions) -> Result<(), ForkError> {
        let need = opts.reserve_pages.saturating_mul(opts.clones as u64);
        // Frames neither charged to a VM nor reserved for one (the reservations are
        // made, clone by clone, by the fork itself).
        let free = self.space.manager().unclaimed_frames();
        if need > 0 && free < need {
            return Err(ForkError::PoolExhausted {
                clones: opts.clones,
                reserve: opts.reserve_pages,
                need,
                free,
            });
        }
        Ok(())
    }

    fn check_limits(&self, opts: &ForkOptions) -> Result<(), ForkError> {
        self.check_reserve(opts)?;
        self.check_fds(opts.clones)
    }

    /// Descriptors for `clones` new VMs made in this process.
    fn check_fds(&self, clones: usize) -> Result<(), ForkError> {
        if clones == 0 {
            // Every clone's VM exists already (shells): the fork opens no descriptor.
            return Ok(());
        }
        let limit = raise_nofile_limit();
        let need = fds_per_vm(self.vm.config().vcpus).saturating_mul(clones as u64);
        let open = open_fds().unwrap_or(0);
        // Keep a little room for the process's own files.
        if open + need + 16 > limit {
            return Err(ForkError::FileLimit {
                clones,
                need,
                open,
                limit,
            });
        }
        Ok(())
    }

    /// Saves every vCPU's state and, unless the parent stays in place, moves a parent
    /// that wrote since its last fork into a fresh VM (`retiree` takes the old one).
    fn save_and_move(
        &self,
        hv: &Hypervisor,
        opts: &ForkOptions,
        retiree: &mut Option<crate::window::Retiree>,
    ) -> Result<(Vec<VcpuState>, ForkTiming), ForkError> {
        let t = Instant::now();
        let states = self
            .vm
            .vcpus()
            .iter()
            .map(|v| v.save_state())
            .collect::<Result<Vec<VcpuState>, _>>()
            .map_err(ForkError::Save)?;
        let mut timing = ForkTiming {
            save_ns: t.elapsed().as_nanos() as u64,
            ..ForkTiming::default()
        };
        let in_place = opts.parent == ParentMode::InPlace;
        self.vm.window().set_swap_on_fork(!in_place);
        if !in_place && self.vm.window().is_dirty() {
            let t = Instant::now();
            // On failure the parent is unchanged and `AddressSpace::fork` protects its
            // window the slower way (protect_for_fork).
            match self.vm.rebirth(hv, &states) {
                Ok(r) => *retiree = Some(r),
                Err(e) => {
                    tracing::warn!("fork: parent stays in its VM ({e}); write-protecting instead")
                }
            }
            timing.rebirth_ns = t.elapsed().as_nanos() as u64;
        }
        Ok((states, timing))
    }
}

/// A clone's configuration: the parent's, taking its state rather than booting.
fn cfg_of(parent: &ManagedVm) -> VmConfig {
    VmConfig {
        load_guest: false,
        ..parent.vm.config().clone()
    }
}

impl Drop for ManagedVm {
    fn drop(&mut self) {
        // SAFETY: `vm` is dropped exactly once, here, and never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.vm) };
        self.space.exit();
    }
}
