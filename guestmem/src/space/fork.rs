//! Copy-on-write fork and exit of an address space.
//!
//! Both keep the only safe order themselves, so that a caller cannot get it wrong:
//! a fork write-protects the parent's host view *before* any block is shared (no guest
//! write can reach a shared frame without faulting), and an exit revokes the host view
//! *before* any frame is freed (no stale mapping can reach a frame another VM gets next).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::counters::Counters;
use super::{AddressSpace, Region, RegionPt, Regions, SpaceError};
use crate::mmu::HostMmu;
use crate::pagetable::PageTable;
use crate::types::VmId;

/// What a fork's child gets besides the shared memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildOptions {
    /// The child's frame limit (`None`: no limit).
    pub limit: Option<u64>,
    /// Frames of the pool reserved for the child's own copies (0: none). The fork fails
    /// with nothing changed if they cannot be reserved.
    pub reserve: u64,
}

impl AddressSpace {
    /// Forks this address space: the child shares every present page copy-on-write.
    ///
    /// No entry is copied: the child's page tables point at the parent's blocks, marked
    /// copy-on-write (On-demand-fork), so the cost grows with blocks (one per 2 MiB), not
    /// pages. The parent's host view is write-protected first, region by region, and
    /// only then are blocks shared; the child's view is filled lazily by its faults. Both
    /// keep running; `child_mmu` is the child's host view. On error nothing is shared,
    /// nothing leaks, and the parent only pays re-faults of its write-protected view.
    pub fn fork(&self, child_mmu: Arc<dyn HostMmu>) -> Result<Arc<AddressSpace>, SpaceError> {
        self.fork_with(child_mmu, ChildOptions::default())
    }

    /// As [`AddressSpace::fork`], with the child's limit and reservation.
    pub fn fork_with(
        &self,
        child_mmu: Arc<dyn HostMmu>,
        opts: ChildOptions,
    ) -> Result<Arc<AddressSpace>, SpaceError> {
        let parent = self.regions.write().map_err(|_| self.poisoned("mmap"))?;
        if parent.exited {
            return Err(SpaceError::Exited(self.id));
        }
        let mm = &self.mm;
        // Protect before sharing: from here on no guest write through the parent's host
        // view reaches a frame without faulting (and faults wait for the mmap lock we
        // hold). A failure leaves nothing shared; the parent's entries still say
        // writable, so its next accesses simply map them again.
        for pr in &parent.list {
            pr.pt
                .mmu
                .protect_for_fork(pr.pt.start, pr.pt.table.pages())
                .map_err(|e| self.host_err(e))?;
        }
        let id = VmId(mm.next_vm.fetch_add(1, Ordering::Relaxed));
        let charge = mm.charges.register(id, opts.limit);
        // Called with `mm.topology` held for writing (inside the loop below) or with
        // nothing linked yet.
        let unwind = |list: &mut Vec<Region>| {
            for mut done in list.drain(..).map(|r| r.rmap) {
                mm.rmap.unlink_anon_vmas(&mut done);
            }
            // Dropping the tables lets go of the shared blocks; the parent keeps them.
            mm.charges.exit(&charge);
        };
        let mut list: Vec<Region> = Vec::with_capacity(parent.list.len());
        if opts.reserve > 0 {
            if let Err(e) = mm.charges.reserve(&charge, opts.reserve) {
                unwind(&mut list);
                return Err(e.into());
            }
        }
        for pr in &parent.list {
            // From sharing the blocks to linking the region, no migration run is in
            // flight (see `space::migrate`).
            let _topology = mm.topology.write().unwrap_or_else(|e| e.into_inner());
            let table = match PageTable::share_from(&pr.pt.table) {
                Ok(t) => t,
                Err(_) => {
                    unwind(&mut list);
                    return Err(self.poisoned("page-table"));
                }
            };
            let pt = Arc::new(RegionPt::new(
                id,
                pr.pt.start,
                table,
                Arc::clone(&child_mmu),
            ));
            let linked = mm
                .rmap
                .region(
                    Arc::clone(&pt),
                    pr.pt.start.0..pr.pt.start.0 + pr.pt.table.pages(),
                )
                .and_then(|mut rr| mm.rmap.anon_vma_fork(&mut rr, &pr.rmap).map(|()| rr));
            match linked {
                Ok(rr) => list.push(Region { pt, rmap: rr }),
                Err(source) => {
                    unwind(&mut list);
                    return Err(SpaceError::Rmap {
                        vm: self.id,
                        source,
                    });
                }
            }
        }
        drop(parent);
        mm.counters.add(&mm.counters.forks, 1);
        let child = Arc::new(AddressSpace {
            id,
            mm: Arc::clone(mm),
            mmu: child_mmu,
            regions: RwLock::new(Regions {
                list,
                exited: false,
            }),
            counters: Counters::default(),
            exited: AtomicBool::new(false),
            charge,
            cow_hint: AtomicU64::new(0),
            streams: Default::default(),
            policy: super::policy::PolicyState::new(self.policy()),
            numa: Default::default(),
            mlocked: RwLock::new(
                self.mlocked
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ),
        });
        child.set_home_node(self.home_node());
        if self.records_touches() {
            child.record_touches();
        }
        mm.register_space(&child);
        Ok(child)
    }

    /// Revokes the host view, returns every frame whose last user this VM was, unlinks
    /// the reverse maps and gives back the VM's reservation. Later calls on the VM return
    /// [`SpaceError::Exited`].
    ///
    /// A region whose host view cannot be revoked keeps its frames for ever (they are
    /// leaked, and logged): a stale mapping must never reach a frame another VM gets. So
    /// do the blocks of a page-table lock poisoned by a panic, and everything of a VM
    /// whose mmap lock was poisoned mid-fork or mid-exit.
    pub fn exit(&self) {
        let mut regions = match self.regions.write() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                if !g.exited {
                    g.exited = true;
                    self.exited.store(true, Ordering::Relaxed);
                    tracing::error!(vm = %self.id, "mmap lock poisoned: the VM's frames are leaked");
                    self.mm.charges.unreserve(&self.charge);
                }
                return;
            }
        };
        if regions.exited {
            return;
        }
        regions.exited = true;
        self.exited.store(true, Ordering::Relaxed);
        let mut freed = Vec::new();
        let mut leaked = 0u64;
        for r in &regions.list {
            let revoked = r.pt.mmu.revoke(r.pt.start, r.pt.table.pages());
            if let Err(e) = &revoked {
                tracing::error!(vm = %self.id, "host view not revoked ({e}); its frames are leaked");
            }
            for b in 0..r.pt.table.blocks() {
                let Ok(mut slot) = r.pt.table.lock_block(b) else {
                    // Poisoned: its entries and counts cannot be trusted.
                    leaked += r.pt.table.block_len(b) as u64;
                    continue;
                };
                if revoked.is_err() {
                    slot.leak();
                    leaked += r.pt.table.block_len(b) as u64;
                    continue;
                }
                // A block still shared by another VM stays with it.
                let Some(block) = slot.take() else {
                    continue;
                };
                drop(slot);
                for &p in block.ptes() {
                    // A migration entry holds its frame's mapping as a present one does.
                    if let Some(pfn) = p.frame() {
                        self.drop_mapping(pfn, &mut freed);
                    } else if let Some(s) = super::swapin::swap_slot(p) {
                        self.mm.swap_put(s);
                    }
                }
                if freed.len() >= 4096 {
                    self.free_frames(&freed);
                    freed.clear();
                }
            }
        }
        self.free_frames(&freed);
        if leaked > 0 {
            tracing::error!(vm = %self.id, pages = leaked, "exit leaked pages it could not free safely");
        }
        {
            let _topology = self.mm.topology.write().unwrap_or_else(|e| e.into_inner());
            for r in regions.list.iter_mut() {
                self.mm.rmap.unlink_anon_vmas(&mut r.rmap);
            }
        }
        self.mm.charges.exit(&self.charge);
        self.mm.counters.add(&self.mm.counters.exits, 1);
    }

    /// Whether the VM has exited.
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed)
    }
}
