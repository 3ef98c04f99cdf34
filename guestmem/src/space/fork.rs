//! Copy-on-write fork and exit of an address space.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::counters::Counters;
use super::{AddressSpace, Region, RegionPt, Regions, SpaceError};
use crate::mmu::HostMmu;
use crate::pagetable::PageTable;
use crate::types::VmId;

impl AddressSpace {
    /// Forks this address space: the child shares every present page copy-on-write.
    ///
    /// No entry is copied: the child's page tables point at the parent's blocks, marked
    /// copy-on-write (On-demand-fork), so the cost grows with blocks (one per 2 MiB), not
    /// pages. The parent's host view is write-protected region by region; the child's is
    /// filled lazily by its faults. Both keep running; `child_mmu` is the child's host
    /// view. On error the parent is as it was (its blocks may be marked copy-on-write,
    /// which only costs a reuse fault) and nothing leaks.
    pub fn fork(&self, child_mmu: Arc<dyn HostMmu>) -> Result<Arc<AddressSpace>, SpaceError> {
        let parent = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if parent.exited {
            return Err(SpaceError::Exited(self.id));
        }
        let mm = &self.mm;
        let id = VmId(mm.next_vm.fetch_add(1, Ordering::Relaxed));
        let mut list: Vec<Region> = Vec::with_capacity(parent.list.len());
        for pr in &parent.list {
            let pt = Arc::new(RegionPt {
                vm: id,
                start: pr.pt.start,
                table: PageTable::share_from(&pr.pt.table),
                mmu: Arc::clone(&child_mmu),
            });
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
                    for mut done in list.drain(..).map(|r| r.rmap) {
                        mm.rmap.unlink_anon_vmas(&mut done);
                    }
                    // Dropping `pt` lets go of the shared blocks; the parent keeps them.
                    return Err(SpaceError::Rmap {
                        vm: self.id,
                        source,
                    });
                }
            }
        }
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
        });
        let mut result = Ok(());
        for pr in &parent.list {
            if let Err(e) = pr.pt.mmu.protect_for_fork(pr.pt.start, pr.pt.table.pages()) {
                result = Err(self.host_err(e));
                break;
            }
        }
        if result.is_err() {
            // Some of the parent's view may still be writable over frames the child now
            // shares: drop all of it, so that every access faults back to the manager.
            for pr in &parent.list {
                let _ = pr.pt.mmu.unmap_run(pr.pt.start, pr.pt.table.pages());
            }
        }
        drop(parent);
        if let Err(e) = result {
            child.exit();
            return Err(e);
        }
        mm.counters.add(&mm.counters.forks, 1);
        Ok(child)
    }

    /// Unmaps everything, returns every frame whose last user this VM was, and unlinks
    /// the reverse maps. Later calls on the VM return [`SpaceError::Exited`].
    pub fn exit(&self) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if regions.exited {
            return;
        }
        regions.exited = true;
        self.exited.store(true, Ordering::Relaxed);
        let mut freed = Vec::new();
        for r in &regions.list {
            for b in 0..r.pt.table.blocks() {
                // A block still shared by another VM stays with it.
                let Some(block) = r.pt.table.lock_block(b).take() else {
                    continue;
                };
                for pfn in block.ptes().iter().filter_map(|p| p.pfn()) {
                    self.drop_mapping(pfn, &mut freed);
                }
                if freed.len() >= 4096 {
                    self.free_frames(&freed);
                    freed.clear();
                }
            }
        }
        self.free_frames(&freed);
        for r in regions.list.iter_mut() {
            self.mm.rmap.unlink_anon_vmas(&mut r.rmap);
        }
        self.mm.counters.add(&self.mm.counters.exits, 1);
    }

    /// Whether the VM has exited.
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Relaxed)
    }
}
