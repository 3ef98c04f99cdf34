//! Access harvesting: what KVM guests touched, copied from their host views into the
//! frames' `REFERENCED` marks, so that reclaim's referenced check sees guest accesses
//! that never pass through the manager.

use super::AddressSpace;
use crate::frame::FrameFlags;
use crate::pagetable::PTES_PER_BLOCK;

impl AddressSpace {
    /// Asks the host view which pages were accessed since the last harvest and marks
    /// their frames referenced. `bits` is scratch space. A region whose view has no
    /// access information, or fails, is left as it is (logged once per failure).
    pub fn harvest(&self, bits: &mut Vec<u64>) {
        self.harvest_with(bits, |_, _| {});
    }

    /// [`AddressSpace::harvest`], calling `seen(gfn, pfn)` for every accessed page with a
    /// frame (its block locked: `seen` must not touch this VM's page tables).
    pub(super) fn harvest_with(
        &self,
        bits: &mut Vec<u64>,
        mut seen: impl FnMut(crate::Gfn, crate::Pfn),
    ) {
        let Ok(regions) = self.read_regions() else {
            return;
        };
        if regions.exited {
            return;
        }
        for r in &regions.list {
            bits.clear();
            match r
                .pt
                .mmu
                .harvest_accessed(r.pt.start, r.pt.table.pages(), bits)
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(vm = %self.id, "access harvest failed: {e}");
                    continue;
                }
            }
            for b in 0..r.pt.table.blocks() {
                let first = b * PTES_PER_BLOCK;
                let words = &bits[(first / 64).min(bits.len())..];
                let words = &words[..(PTES_PER_BLOCK / 64).min(words.len())];
                if words.iter().all(|&w| w == 0) {
                    continue;
                }
                let Ok(slot) = r.pt.table.lock_block(b) else {
                    continue;
                };
                for (wi, &w) in words.iter().enumerate() {
                    let mut w = w;
                    while w != 0 {
                        let s = wi * 64 + w.trailing_zeros() as usize;
                        w &= w - 1;
                        if s >= r.pt.table.block_len(b) {
                            break;
                        }
                        if let Some(pfn) = slot.pte(s).pfn() {
                            let f = self.mm.pool.frame(pfn);
                            if !f.flags().contains(FrameFlags::REFERENCED) {
                                f.set(FrameFlags::REFERENCED);
                            }
                            seen(r.pt.gfn((first + s) as u64), pfn);
                        }
                    }
                }
            }
        }
    }
}
