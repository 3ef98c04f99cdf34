//! Guest page tables: one per region, split into blocks of [`PTES_PER_BLOCK`] entries,
//! each block under its own lock (the `pte_lockptr` analogue of seed 1).
//!
//! An entry ([`Pte`]) is one `u64`: empty, present (a frame, writable or not, young or
//! not), or one of the non-present kinds that reclaim and migration leave behind (a swap
//! slot, a frame under migration). Entries are only read and written with their block
//! locked, so a thread holding a block lock sees and changes a consistent set of 512
//! entries, and frames' mapcounts change in step with them.

use crate::sync::{Mutex, MutexGuard, lock, try_lock};
use crate::types::Pfn;

/// Entries per page-table block (one lock each): 512, as an x86 page-table page.
pub const PTES_PER_BLOCK: usize = 512;

/// One guest page-table entry, packed in a `u64`.
///
/// ```text
/// present:   [63..44 0][43..12 pfn][11..4 0][3 dirty][2 young][1 writable][0 = 1]
/// swap:      [63..4 slot][3..1 = 001][0 = 0]
/// migration: [63..12 0][43..12 pfn][3..1 = 010][0 = 0]
/// empty:     all zero
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pte(u64);

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const YOUNG: u64 = 1 << 2;
const DIRTY: u64 = 1 << 3;
const PFN_SHIFT: u32 = 12;
const PFN_BITS: u32 = 32;
const KIND_SHIFT: u32 = 1;
const KIND_MASK: u64 = 0b111 << KIND_SHIFT;
const KIND_SWAP: u64 = 0b001 << KIND_SHIFT;
const KIND_MIGRATION: u64 = 0b010 << KIND_SHIFT;
const SLOT_SHIFT: u32 = 4;

const _: () = assert!(PFN_SHIFT + PFN_BITS <= 64, "pfn field must fit");
const _: () = assert!(PFN_SHIFT > 3, "pfn field must not overlap the flag bits");
const _: () = assert!(
    SLOT_SHIFT > KIND_SHIFT + 2,
    "slot field must not overlap the kind"
);

/// What an entry says, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PteKind {
    /// Nothing: the page was never touched (reads as zero).
    Empty,
    /// Backed by a frame.
    Present {
        /// The frame.
        pfn: Pfn,
        /// Guest writes may go straight to the frame.
        writable: bool,
    },
    /// Swapped out to a slot of the swap file.
    Swap {
        /// The slot.
        slot: u64,
    },
    /// Being migrated away from this frame; faults wait for the migration.
    Migration {
        /// The frame being migrated.
        pfn: Pfn,
    },
}

impl Pte {
    /// The empty entry.
    pub const EMPTY: Pte = Pte(0);

    /// A present entry.
    #[inline]
    pub fn present(pfn: Pfn, writable: bool) -> Pte {
        let w = if writable { WRITABLE } else { 0 };
        Pte(PRESENT | w | YOUNG | (u64::from(pfn.0) << PFN_SHIFT))
    }

    /// A swap entry.
    pub fn swap(slot: u64) -> Pte {
        debug_assert!(slot < 1 << (64 - SLOT_SHIFT));
        Pte(KIND_SWAP | (slot << SLOT_SHIFT))
    }

    /// A migration entry.
    pub fn migration(pfn: Pfn) -> Pte {
        Pte(KIND_MIGRATION | (u64::from(pfn.0) << PFN_SHIFT))
    }

    /// Decodes the entry.
    #[inline]
    pub fn kind(self) -> PteKind {
        if self.0 & PRESENT != 0 {
            return PteKind::Present {
                pfn: self.pfn_bits(),
                writable: self.0 & WRITABLE != 0,
            };
        }
        match self.0 & KIND_MASK {
            0 => PteKind::Empty,
            KIND_SWAP => PteKind::Swap {
                slot: self.0 >> SLOT_SHIFT,
            },
            _ => PteKind::Migration {
                pfn: self.pfn_bits(),
            },
        }
    }

    #[inline]
    fn pfn_bits(self) -> Pfn {
        Pfn((self.0 >> PFN_SHIFT) as u32)
    }

    /// The frame, if present.
    #[inline]
    pub fn pfn(self) -> Option<Pfn> {
        (self.0 & PRESENT != 0).then(|| self.pfn_bits())
    }

    /// Whether the entry maps a frame.
    #[inline]
    pub fn is_present(self) -> bool {
        self.0 & PRESENT != 0
    }

    /// Whether the entry is empty.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether a present entry is writable.
    #[inline]
    pub fn is_writable(self) -> bool {
        self.0 & (PRESENT | WRITABLE) == PRESENT | WRITABLE
    }

    /// Whether a present entry was accessed since the young bit was last cleared.
    #[inline]
    pub fn is_young(self) -> bool {
        self.0 & (PRESENT | YOUNG) == PRESENT | YOUNG
    }

    /// Whether a present entry was written through since it was mapped.
    #[inline]
    pub fn is_dirty(self) -> bool {
        self.0 & (PRESENT | DIRTY) == PRESENT | DIRTY
    }

    /// This present entry without write permission.
    #[inline]
    pub fn wrprotect(self) -> Pte {
        Pte(self.0 & !WRITABLE)
    }

    /// This present entry with write permission.
    #[inline]
    pub fn mkwrite(self) -> Pte {
        Pte(self.0 | WRITABLE)
    }

    /// This present entry, young.
    #[inline]
    pub fn mkyoung(self) -> Pte {
        Pte(self.0 | YOUNG)
    }

    /// This present entry, not young.
    #[inline]
    pub fn mkold(self) -> Pte {
        Pte(self.0 & !YOUNG)
    }

    /// This present entry, dirty.
    #[inline]
    pub fn mkdirty(self) -> Pte {
        Pte(self.0 | DIRTY)
    }

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.kind())?;
        if self.is_young() {
            write!(f, "+young")?;
        }
        if self.is_dirty() {
            write!(f, "+dirty")?;
        }
        Ok(())
    }
}

/// One block of entries, the data under one page-table lock.
#[derive(Debug)]
pub struct Block {
    /// The entries.
    pub ptes: [Pte; PTES_PER_BLOCK],
}

/// A region's page table: `pages` entries in blocks, one lock per block.
#[derive(Debug)]
pub struct PageTable {
    blocks: Box<[Mutex<Block>]>,
    pages: u64,
}

impl PageTable {
    /// An empty table of `pages` entries.
    pub fn new(pages: u64) -> PageTable {
        let n = pages.div_ceil(PTES_PER_BLOCK as u64) as usize;
        PageTable {
            blocks: (0..n)
                .map(|_| {
                    Mutex::new(Block {
                        ptes: [Pte::EMPTY; PTES_PER_BLOCK],
                    })
                })
                .collect(),
            pages,
        }
    }

    /// Entries in the table.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Blocks in the table.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Locks the block holding entry `index`; returns the guard and the entry's slot in it.
    #[inline]
    pub fn lock(&self, index: u64) -> (MutexGuard<'_, Block>, usize) {
        debug_assert!(index < self.pages);
        let b = (index / PTES_PER_BLOCK as u64) as usize;
        (
            lock(&self.blocks[b]),
            (index % PTES_PER_BLOCK as u64) as usize,
        )
    }

    /// Locks block `b`.
    #[inline]
    pub fn lock_block(&self, b: usize) -> MutexGuard<'_, Block> {
        lock(&self.blocks[b])
    }

    /// Tries to lock the block holding entry `index` (reclaim's referenced check, seed 1).
    pub fn try_lock(&self, index: u64) -> Option<(MutexGuard<'_, Block>, usize)> {
        let b = (index / PTES_PER_BLOCK as u64) as usize;
        try_lock(&self.blocks[b]).map(|g| (g, (index % PTES_PER_BLOCK as u64) as usize))
    }

    /// Entries of block `b` that exist (the last block may be partial).
    pub fn block_len(&self, b: usize) -> usize {
        let start = b as u64 * PTES_PER_BLOCK as u64;
        (self.pages - start).min(PTES_PER_BLOCK as u64) as usize
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_every_kind() {
        let p = Pte::present(Pfn(0xdead_beef), true);
        assert_eq!(
            p.kind(),
            PteKind::Present {
                pfn: Pfn(0xdead_beef),
                writable: true
            }
        );
        assert!(p.is_young() && p.is_writable() && !p.is_dirty());
        assert!(!p.wrprotect().is_writable());
        assert!(p.mkdirty().is_dirty());
        assert!(!p.mkold().is_young());
        assert_eq!(Pte::swap(12345).kind(), PteKind::Swap { slot: 12345 });
        assert_eq!(
            Pte::migration(Pfn(7)).kind(),
            PteKind::Migration { pfn: Pfn(7) }
        );
        assert_eq!(Pte::EMPTY.kind(), PteKind::Empty);
        assert_eq!(Pte::swap(0).kind(), PteKind::Swap { slot: 0 });
    }

    #[test]
    fn table_splits_into_blocks_with_a_partial_last_one() {
        let t = PageTable::new(1000);
        assert_eq!(t.blocks(), 2);
        assert_eq!(t.block_len(0), 512);
        assert_eq!(t.block_len(1), 488);
        let (g, i) = t.lock(513);
        assert_eq!(i, 1);
        assert!(t.try_lock(600).is_none(), "same block is locked");
        drop(g);
        assert!(t.try_lock(600).is_some());
    }
}
