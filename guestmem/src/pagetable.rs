//! Guest page tables: one per region, split into blocks of [`PTES_PER_BLOCK`] entries,
//! each block under its own lock (the `pte_lockptr` analogue of seed 1).
//!
//! An entry ([`Pte`]) is one `u64`: empty, present (a frame, writable or not, young or
//! not), or one of the non-present kinds that reclaim and migration leave behind (a swap
//! slot, a frame under migration). Entries are only read and written with their block
//! locked, so a thread holding a block lock sees and changes a consistent set of 512
//! entries, and frames' mapcounts change in step with them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, MutexGuard};
use crate::types::Pfn;

/// A block lock whose holder panicked: its entries and the frames' counts may be half
/// updated, so nothing may use them as if nothing had happened. The VM owning the table
/// is failed; its frames are kept (leaked) rather than handed to anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a page-table lock was poisoned by a panic while it was held")]
pub struct Poisoned;

fn lock_checked<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, Poisoned> {
    m.lock().map_err(|_| Poisoned)
}

/// Entries per page-table block (one lock each): 512, as an x86 page-table page.
pub const PTES_PER_BLOCK: usize = 512;

/// One guest page-table entry, packed in a `u64`.
///
/// The permission and state changes (`mkwrite`, `mkyoung`, `mkold`, `mkdirty`) apply to
/// present entries only and leave any other entry as it is: in a swap or migration entry
/// those bits are the kind. `wrprotect` also clears a migration entry's saved write bit
/// (a block copied for copy-on-write must come back read-only).
///
/// A migration entry keeps the present entry's writable, young and dirty bits in its own
/// places, so that the entry comes back with the permissions it had
/// ([`Pte::migration_of`], [`Pte::migrated_to`]). It names the frame being moved, which
/// keeps the mapping and the reference the present entry held until the entry is
/// restored (as a frame's mapcount counts blocks, a migration entry is counted like a
/// present one: see [`Pte::frame`]).
///
/// ```text
/// present:   [63..44 0][43..12 pfn][11..4 0][3 dirty][2 young][1 writable][0 = 1]
/// swap:      [63..4 slot][3..1 = 001][0 = 0]
/// migration: [63..44 0][43..12 pfn][11..7 0][6 dirty][5 young][4 writable][3..1 = 010][0 = 0]
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
const MIG_WRITABLE: u64 = 1 << 4;
const MIG_YOUNG: u64 = 1 << 5;
const MIG_DIRTY: u64 = 1 << 6;
const _: () = assert!(MIG_DIRTY < 1 << PFN_SHIFT, "migration flags below the pfn");

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

    /// A migration entry (not writable, not young, not dirty).
    pub fn migration(pfn: Pfn) -> Pte {
        Pte(KIND_MIGRATION | (u64::from(pfn.0) << PFN_SHIFT))
    }

    /// The migration entry replacing the present entry `self`: same frame, with its
    /// writable, young and dirty bits kept. `None` for an entry that is not present.
    pub fn migration_of(self) -> Option<Pte> {
        let pfn = self.pfn()?;
        let mut m = Pte::migration(pfn).0;
        if self.0 & WRITABLE != 0 {
            m |= MIG_WRITABLE;
        }
        if self.0 & YOUNG != 0 {
            m |= MIG_YOUNG;
        }
        if self.0 & DIRTY != 0 {
            m |= MIG_DIRTY;
        }
        Some(Pte(m))
    }

    /// The present entry a migration entry becomes once its page is at `pfn`, with the
    /// writable, young and dirty bits it kept. `None` for an entry that is not a
    /// migration entry.
    pub fn migrated_to(self, pfn: Pfn) -> Option<Pte> {
        if !self.is_migration() {
            return None;
        }
        let mut p = Pte::present(pfn, self.0 & MIG_WRITABLE != 0).0 & !YOUNG;
        if self.0 & MIG_YOUNG != 0 {
            p |= YOUNG;
        }
        if self.0 & MIG_DIRTY != 0 {
            p |= DIRTY;
        }
        Some(Pte(p))
    }

    /// Whether the entry is a migration entry.
    #[inline]
    pub fn is_migration(self) -> bool {
        self.0 & PRESENT == 0 && self.0 & KIND_MASK == KIND_MIGRATION
    }

    /// The frame the entry holds a mapping of: a present entry's, or a migration
    /// entry's (the frame being moved).
    #[inline]
    pub fn frame(self) -> Option<Pfn> {
        (self.is_present() || self.is_migration()).then(|| self.pfn_bits())
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

    /// This present entry without write permission; a migration entry without its saved
    /// write permission.
    #[inline]
    pub fn wrprotect(self) -> Pte {
        if self.is_present() {
            Pte(self.0 & !WRITABLE)
        } else if self.is_migration() {
            Pte(self.0 & !MIG_WRITABLE)
        } else {
            self
        }
    }

    /// This present entry with write permission.
    #[inline]
    pub fn mkwrite(self) -> Pte {
        if self.is_present() {
            Pte(self.0 | WRITABLE)
        } else {
            self
        }
    }

    /// This present entry, young.
    #[inline]
    pub fn mkyoung(self) -> Pte {
        if self.is_present() {
            Pte(self.0 | YOUNG)
        } else {
            self
        }
    }

    /// This present entry, not young.
    #[inline]
    pub fn mkold(self) -> Pte {
        if self.is_present() {
            Pte(self.0 & !YOUNG)
        } else {
            self
        }
    }

    /// This present entry, dirty.
    #[inline]
    pub fn mkdirty(self) -> Pte {
        if self.is_present() {
            Pte(self.0 | DIRTY)
        } else {
            self
        }
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

/// One block of [`PTES_PER_BLOCK`] entries.
///
/// Blocks are shared between a forked VM and its children (On-demand-fork, EuroSys'21):
/// a fork copies no entries, it only points the child's slots at the parent's blocks
/// and marks them `cow`. A shared block is read-only for everyone; the first VM that must
/// change an entry in it copies the block ([`Slot::make_exclusive`]), taking a mapping
/// on every frame the copy names. A block that was shared and is now one VM's alone
/// still has `cow` set: its write bits are stale (the frames may be mapped elsewhere) and
/// are cleared before the VM changes anything in it.
///
/// Young bits of a shared block change without a copy: the entries are read-only, so
/// the block keeps two atomic bitmaps beside them, `old` (the entry's own young bit is
/// cleared) and `touched` (accessed since), which any sharer may change under its own
/// page-table lock. They are hints, as the hardware's accessed bits are: a touch racing
/// with a check may be lost. A copy folds them into its entries.
#[derive(Debug)]
pub struct Block {
    ptes: [Pte; PTES_PER_BLOCK],
    cow: bool,
    old: [AtomicU64; PTES_PER_BLOCK / 64],
    touched: [AtomicU64; PTES_PER_BLOCK / 64],
}

impl Clone for Block {
    fn clone(&self) -> Block {
        let mut b = Block::empty();
        b.cow = self.cow;
        for (i, p) in self.ptes.iter().enumerate() {
            b.ptes[i] = if !p.is_present() {
                *p
            } else if self.is_young(i) {
                p.mkyoung()
            } else {
                p.mkold()
            };
        }
        b
    }
}

#[inline]
fn bit(words: &[AtomicU64], s: usize) -> bool {
    // Relaxed: young bits are hints (see `Block`).
    words[s / 64].load(Ordering::Relaxed) & (1 << (s % 64)) != 0
}

impl Block {
    fn empty() -> Block {
        Block {
            ptes: [Pte::EMPTY; PTES_PER_BLOCK],
            cow: false,
            old: Default::default(),
            touched: Default::default(),
        }
    }

    /// Whether entry `s` is present and was accessed since its young bit was last
    /// cleared (by its entry bit or, in a shared block, the bitmaps).
    #[inline]
    pub fn is_young(&self, s: usize) -> bool {
        let p = self.ptes[s];
        p.is_present() && (p.is_young() && !bit(&self.old, s) || bit(&self.touched, s))
    }

    /// Marks entry `s` accessed without changing the (possibly shared) block's entries.
    #[inline]
    pub fn touch_shared(&self, s: usize) {
        if !bit(&self.touched, s) {
            self.touched[s / 64].fetch_or(1 << (s % 64), Ordering::Relaxed);
        }
    }

    /// Reads and clears entry `s`'s young state without changing the entries (for a
    /// block other VMs share).
    pub fn test_and_clear_young_shared(&self, s: usize) -> bool {
        let young = self.is_young(s);
        if young {
            self.old[s / 64].fetch_or(1 << (s % 64), Ordering::Relaxed);
            self.touched[s / 64].fetch_and(!(1 << (s % 64)), Ordering::Relaxed);
        }
        young
    }

    /// Folds the bitmaps into the entries (the block is one VM's alone now).
    fn fold_young(&mut self) {
        let dirty = self
            .old
            .iter()
            .chain(self.touched.iter())
            .any(|w| w.load(Ordering::Relaxed) != 0);
        if !dirty {
            return;
        }
        for s in 0..PTES_PER_BLOCK {
            let p = self.ptes[s];
            if p.is_present() {
                self.ptes[s] = if self.is_young(s) {
                    p.mkyoung()
                } else {
                    p.mkold()
                };
            }
        }
        for w in self.old.iter().chain(self.touched.iter()) {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Entry `s`.
    #[inline]
    pub fn get(&self, s: usize) -> Pte {
        self.ptes[s]
    }

    /// Sets entry `s`.
    #[inline]
    pub fn set(&mut self, s: usize, pte: Pte) {
        self.ptes[s] = pte;
    }

    /// All entries.
    pub fn ptes(&self) -> &[Pte; PTES_PER_BLOCK] {
        &self.ptes
    }
}

/// A VM's pointer to one block (`None`: all 512 entries empty), the data under one
/// page-table lock.
#[derive(Debug, Default)]
pub struct Slot {
    block: Option<Arc<Block>>,
}

impl Slot {
    /// Entry `s` as stored (its write bit may be stale: see [`Slot::effective`]).
    #[inline]
    pub fn pte(&self, s: usize) -> Pte {
        self.block.as_ref().map_or(Pte::EMPTY, |b| b.ptes[s])
    }

    /// Entry `s` as the VM may use it: writable only if the block is this VM's alone and
    /// no longer copy-on-write.
    #[inline]
    pub fn effective(&self, s: usize) -> Pte {
        match &self.block {
            None => Pte::EMPTY,
            Some(b) if b.cow || Arc::strong_count(b) > 1 => {
                let p = b.ptes[s].wrprotect();
                if b.is_young(s) {
                    p.mkyoung()
                } else {
                    p.mkold()
                }
            }
            Some(b) => b.ptes[s],
        }
    }

    /// Reclaim's test-and-clear of entry `s`'s young state: in the entry itself if the
    /// block is this VM's alone, in the block's bitmaps if it is shared.
    pub fn test_and_clear_young(&mut self, s: usize) -> bool {
        if let Some(b) = self.unique_mut() {
            b.fold_young();
            let p = b.ptes[s];
            if p.is_young() {
                b.ptes[s] = p.mkold();
                return true;
            }
            return false;
        }
        self.block
            .as_ref()
            .is_some_and(|b| b.test_and_clear_young_shared(s))
    }

    /// Whether entry `s` is young, without clearing it (see [`Block::is_young`]).
    pub fn peek_young(&self, s: usize) -> bool {
        self.block.as_ref().is_some_and(|b| b.is_young(s))
    }

    /// Marks entry `s` accessed (and written, for `dirty`) by this VM.
    #[inline]
    pub fn mark_accessed(&mut self, s: usize, dirty: bool) {
        if let Some(b) = self.unique_mut() {
            b.fold_young();
            let p = b.ptes[s];
            b.ptes[s] = if dirty {
                p.mkyoung().mkdirty()
            } else {
                p.mkyoung()
            };
        } else if let Some(b) = &self.block {
            b.touch_shared(s);
        }
    }

    /// VMs pointing at this block (0 for an empty slot).
    pub fn sharers(&self) -> usize {
        self.block.as_ref().map_or(0, Arc::strong_count)
    }

    /// An identity for the block (its address; 0 for none), for tests and tools.
    pub fn block_id(&self) -> usize {
        self.block.as_ref().map_or(0, |b| Arc::as_ptr(b) as usize)
    }

    /// The block, if this VM is its only user (without clearing `cow`): for changes that
    /// do not depend on write bits, such as clearing a young bit.
    pub fn unique_mut(&mut self) -> Option<&mut Block> {
        self.block.as_mut().and_then(Arc::get_mut)
    }

    /// Makes the block this VM's own, with valid write bits, and returns it.
    ///
    /// An empty slot gets a new empty block. A shared block is copied: `dup` is called for
    /// every non-empty entry of the copy (the caller takes a mapping on its frame, or a
    /// reference on its swap slot), and the copy's entries are write-protected. If this VM
    /// turns out to have been the last user of the shared block (the others let go
    /// meanwhile), `release` is called for every non-empty entry of the old block (the
    /// caller drops those mappings and slot references). A `cow` block this
    /// VM owns alone has all its entries write-protected once.
    pub fn make_exclusive(
        &mut self,
        mut dup: impl FnMut(Pte),
        mut release: impl FnMut(Pte),
    ) -> &mut Block {
        let arc = self.block.get_or_insert_with(|| Arc::new(Block::empty()));
        if Arc::get_mut(arc).is_none() {
            let mut copy = Block::clone(arc);
            copy.cow = false;
            for p in copy.ptes.iter_mut().filter(|p| !p.is_empty()) {
                dup(*p);
                *p = p.wrprotect();
            }
            let old = std::mem::replace(arc, Arc::new(copy));
            if let Some(last) = Arc::into_inner(old) {
                last.ptes
                    .iter()
                    .filter(|p| !p.is_empty())
                    .for_each(|p| release(*p));
            }
        }
        let Some(block) = Arc::get_mut(arc) else {
            unreachable!("a block just copied or found unique has one owner");
        };
        block.fold_young();
        if block.cow {
            for p in block.ptes.iter_mut().filter(|p| p.is_present()) {
                *p = p.wrprotect();
            }
            block.cow = false;
        }
        block
    }

    /// For fork: marks the block copy-on-write and returns a slot sharing it.
    pub fn share(&mut self) -> Slot {
        if let Some(arc) = self.block.as_mut() {
            if let Some(b) = Arc::get_mut(arc) {
                b.cow = true;
            }
            debug_assert!(arc.cow, "a shared block is always cow");
        }
        Slot {
            block: self.block.clone(),
        }
    }

    /// For an exit whose host view could not be revoked: keeps the block (and so its
    /// frames) alive for ever, so that no frame a stale host mapping may still reach is
    /// ever freed and handed to another VM. Leaking beats handing on.
    pub fn leak(&mut self) {
        if let Some(b) = self.block.take() {
            std::mem::forget(b);
        }
    }

    /// For exit: empties the slot; returns the block if this VM was its last user (the
    /// caller drops the block's mappings).
    pub fn take(&mut self) -> Option<Block> {
        self.block.take().and_then(Arc::into_inner)
    }
}

/// A region's page table: `pages` entries in blocks, one lock per block.
#[derive(Debug)]
pub struct PageTable {
    slots: Box<[Mutex<Slot>]>,
    pages: u64,
}

impl PageTable {
    /// An empty table of `pages` entries.
    pub fn new(pages: u64) -> PageTable {
        let n = pages.div_ceil(PTES_PER_BLOCK as u64) as usize;
        PageTable {
            slots: (0..n).map(|_| Mutex::new(Slot::default())).collect(),
            pages,
        }
    }

    /// A table sharing every block of `parent` (fork): O(blocks), no entry is copied.
    /// Refused if any of the parent's block locks is poisoned.
    pub fn share_from(parent: &PageTable) -> Result<PageTable, Poisoned> {
        let slots = parent
            .slots
            .iter()
            .map(|s| lock_checked(s).map(|mut g| Mutex::new(g.share())))
            .collect::<Result<_, _>>()?;
        Ok(PageTable {
            slots,
            pages: parent.pages,
        })
    }

    /// Entries in the table.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Blocks in the table.
    pub fn blocks(&self) -> usize {
        self.slots.len()
    }

    /// Locks the block holding entry `index`; returns the guard and the entry's slot in it.
    #[inline]
    pub fn lock(&self, index: u64) -> Result<(MutexGuard<'_, Slot>, usize), Poisoned> {
        debug_assert!(index < self.pages);
        let b = (index / PTES_PER_BLOCK as u64) as usize;
        Ok((
            lock_checked(&self.slots[b])?,
            (index % PTES_PER_BLOCK as u64) as usize,
        ))
    }

    /// Locks block `b`.
    #[inline]
    pub fn lock_block(&self, b: usize) -> Result<MutexGuard<'_, Slot>, Poisoned> {
        lock_checked(&self.slots[b])
    }

    /// Tries to lock the block holding entry `index` (reclaim's referenced check, seed 1):
    /// `Ok(None)` when another thread holds it.
    pub fn try_lock(&self, index: u64) -> Result<Option<(MutexGuard<'_, Slot>, usize)>, Poisoned> {
        let b = (index / PTES_PER_BLOCK as u64) as usize;
        let s = (index % PTES_PER_BLOCK as u64) as usize;
        match self.slots[b].try_lock() {
            Ok(g) => Ok(Some((g, s))),
            Err(std::sync::TryLockError::WouldBlock) => Ok(None),
            Err(std::sync::TryLockError::Poisoned(_)) => Err(Poisoned),
        }
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
        // A migration entry keeps the permissions and state it replaced.
        for (w, young, dirty) in [
            (true, true, true),
            (false, false, false),
            (true, false, true),
        ] {
            let mut e = Pte::present(Pfn(9), w);
            if !young {
                e = e.mkold();
            }
            if dirty {
                e = e.mkdirty();
            }
            let m = e.migration_of().unwrap();
            assert_eq!(m.kind(), PteKind::Migration { pfn: Pfn(9) });
            assert_eq!(m.frame(), Some(Pfn(9)));
            assert_eq!(m.pfn(), None, "not present");
            let back = m.migrated_to(Pfn(20)).unwrap();
            assert_eq!(back.pfn(), Some(Pfn(20)));
            assert_eq!(
                (back.is_writable(), back.is_young(), back.is_dirty()),
                (w, young, dirty)
            );
            assert!(!m.wrprotect().migrated_to(Pfn(1)).unwrap().is_writable());
        }
        assert_eq!(Pte::swap(3).migration_of(), None);
        assert_eq!(Pte::present(Pfn(3), true).migrated_to(Pfn(4)), None);
        assert_eq!(Pte::swap(3).frame(), None);
        // Permission changes leave non-present entries alone (their bits are the kind).
        let sw = Pte::swap(77);
        for changed in [
            sw.wrprotect(),
            sw.mkwrite(),
            sw.mkyoung(),
            sw.mkold(),
            sw.mkdirty(),
        ] {
            assert_eq!(changed.kind(), PteKind::Swap { slot: 77 });
        }
    }

    #[test]
    fn table_splits_into_blocks_with_a_partial_last_one() {
        let t = PageTable::new(1000);
        assert_eq!(t.blocks(), 2);
        assert_eq!(t.block_len(0), 512);
        assert_eq!(t.block_len(1), 488);
        let (g, i) = t.lock(513).unwrap();
        assert_eq!(i, 1);
        assert_eq!(g.pte(1), Pte::EMPTY);
        assert!(t.try_lock(600).unwrap().is_none(), "same block is locked");
        drop(g);
        assert!(t.try_lock(600).unwrap().is_some());
    }

    #[test]
    fn a_lock_poisoned_by_a_panic_is_reported_not_used() {
        let t = PageTable::new(1000);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = t.lock(3).unwrap();
            panic!("injected while holding block 0");
        }));
        assert!(r.is_err());
        assert_eq!(t.lock(5).err(), Some(Poisoned));
        assert!(t.try_lock(5).is_err());
        assert!(t.lock_block(0).is_err());
        assert!(PageTable::share_from(&t).is_err());
        // The other block is untouched.
        assert!(t.lock(600).is_ok());
    }
}

#[cfg(all(test, not(loom)))]
mod sharing_tests {
    use super::*;

    #[test]
    fn a_shared_block_is_read_only_and_copied_on_first_change() {
        let mut parent = Slot::default();
        parent
            .make_exclusive(|_| {}, |_| {})
            .set(3, Pte::present(Pfn(9), true));
        assert!(parent.effective(3).is_writable());
        let mut child = parent.share();
        assert_eq!(child.sharers(), 2);
        assert!(!parent.effective(3).is_writable(), "shared: read-only");
        let mut dups = 0;
        let b = child.make_exclusive(|_| dups += 1, |_| panic!("parent still holds it"));
        assert!(!b.get(3).is_writable(), "the copy is write-protected");
        assert_eq!(dups, 1);
        assert_ne!(child.block_id(), parent.block_id());
        // The parent owns its block alone again, but its write bit is stale until cleared.
        assert_eq!(parent.sharers(), 1);
        assert!(!parent.effective(3).is_writable());
        let pb = parent.make_exclusive(|_| panic!("no copy"), |_| panic!("no release"));
        assert!(!pb.get(3).is_writable());
        assert!(parent.effective(3).pfn() == Some(Pfn(9)));
    }

    #[test]
    fn the_last_user_to_take_a_block_gets_it() {
        let mut a = Slot::default();
        a.make_exclusive(|_| {}, |_| {})
            .set(0, Pte::present(Pfn(1), true));
        let mut b = a.share();
        assert!(a.take().is_none(), "b still uses it");
        assert!(b.take().is_some(), "b was last");
    }
}
