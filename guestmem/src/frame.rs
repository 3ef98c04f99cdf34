//! Frame descriptors: the `struct page` of this manager.
//!
//! One [`Frame`] per host frame, in a table owned by its node and indexed by [`Pfn`].
//! Everything in it is atomic so that the hot paths (faults, reclaim's referenced check,
//! migration) read it without a lock. Which lock orders writes to each field is stated on
//! the field.
//!
//! [`Pfn`]: crate::types::Pfn

use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Frame flags, packed in one `u32` (the `page->flags` analogue).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(u32);

impl FrameFlags {
    /// Locked (PG_locked): swap-out or migration owns the frame's contents.
    pub const LOCKED: FrameFlags = FrameFlags(1 << 0);
    /// Referenced since the last reclaim scan (PG_referenced).
    pub const REFERENCED: FrameFlags = FrameFlags(1 << 1);
    /// On the active LRU list (PG_active).
    pub const ACTIVE: FrameFlags = FrameFlags(1 << 2);
    /// Contents differ from the swap copy (PG_dirty).
    pub const DIRTY: FrameFlags = FrameFlags(1 << 3);
    /// Anonymous, swap-backed memory (PG_swapbacked).
    pub const SWAP_BACKED: FrameFlags = FrameFlags(1 << 4);
    /// On an LRU list (PG_lru).
    pub const LRU: FrameFlags = FrameFlags(1 << 5);
    /// Taken off the LRU by reclaim or migration (isolated).
    pub const ISOLATED: FrameFlags = FrameFlags(1 << 6);
    /// Contents are known to be zero (fresh or hole-punched): zeroing can be skipped.
    pub const KNOWN_ZERO: FrameFlags = FrameFlags(1 << 7);
    /// Owned by someone (between alloc and free); checked in debug builds to catch
    /// double frees and double allocations.
    pub const ALLOCATED: FrameFlags = FrameFlags(1 << 8);
    /// No host memory backs the frame yet (never touched, or returned with a punched
    /// hole): it reads as zero, but must be populated before a host view maps it, or
    /// a guest access through a userfaultfd-registered window would fault forever.
    pub const UNBACKED: FrameFlags = FrameFlags(1 << 9);
    /// In the swap cache: a swap slot holds (or is about to hold) the frame's contents,
    /// and entries naming that slot are resolved to this frame without I/O. Set and
    /// cleared under the swap cache lock.
    pub const SWAPCACHE: FrameFlags = FrameFlags(1 << 10);
    /// Locked in memory: mapped at a page some VM keeps resident (`mlock`), so reclaim
    /// leaves it alone. Cleared when the frame is freed.
    pub const MLOCKED: FrameFlags = FrameFlags(1 << 11);

    const ALL: u32 = (1 << 12) - 1;

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set in `self`.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

const _: () = assert!(
    FrameFlags::ALL.count_ones() == 12,
    "flag bits must be contiguous"
);

impl std::ops::BitOr for FrameFlags {
    type Output = FrameFlags;
    fn bitor(self, rhs: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 | rhs.0)
    }
}

impl std::fmt::Debug for FrameFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [&str; 12] = [
            "locked",
            "referenced",
            "active",
            "dirty",
            "swapbacked",
            "lru",
            "isolated",
            "zero",
            "allocated",
            "unbacked",
            "swapcache",
            "mlocked",
        ];
        let names: Vec<&str> = (0..12)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| NAMES[b])
            .collect();
        write!(f, "FrameFlags({})", names.join("|"))
    }
}

/// One host frame's descriptor.
#[derive(Debug)]
pub struct Frame {
    /// [`FrameFlags`] bits. Set and cleared with atomic RMW; LOCKED is the frame lock.
    flags: AtomicU32,
    /// References: page-table entries, swap-cache and transient holders (get_page).
    /// Changed under the page-table lock of the entry that adds or drops a reference.
    refcount: AtomicU32,
    /// Page-table entries mapping this frame (0 = unmapped), changed under the
    /// page-table lock of the entry.
    mapcount: AtomicU32,
    /// The [`Charge`](crate::charge::Charge) this frame is charged to (0: none). Set by
    /// the allocating VM before the frame is mapped, taken back when it is freed.
    charge: AtomicU32,
    /// The rmap link: the anon_vma this frame is filed under, as a raw pointer from
    /// `rmap` (0 = none). Written with the frame locked or before it is mapped.
    mapping: AtomicUsize,
    /// The frame's page offset within its anon_vma (the `page->index` analogue).
    index: AtomicU64,
}

// The charge id lives in what was padding: a descriptor stays 32 bytes (two per cache
// line pair; 0.8% of the memory it describes).
#[cfg(all(not(loom), target_pointer_width = "64"))]
const _: () = assert!(std::mem::size_of::<Frame>() == 32);

impl Default for Frame {
    /// A free frame with no flags. (Written out because loom's atomics, swapped in by
    /// `crate::sync` under `--cfg loom`, do not implement `Default`.)
    fn default() -> Frame {
        Frame {
            flags: AtomicU32::new(0),
            refcount: AtomicU32::new(0),
            mapcount: AtomicU32::new(0),
            charge: AtomicU32::new(0),
            mapping: AtomicUsize::new(0),
            index: AtomicU64::new(0),
        }
    }
}

impl Frame {
    /// The frame's flags now.
    #[inline]
    pub fn flags(&self) -> FrameFlags {
        FrameFlags(self.flags.load(Ordering::Acquire))
    }

    /// Sets `f`; returns the flags before.
    #[inline]
    pub fn set(&self, f: FrameFlags) -> FrameFlags {
        // AcqRel: pairs with the Acquire in `flags()` and `try_lock` of other threads.
        FrameFlags(self.flags.fetch_or(f.0, Ordering::AcqRel))
    }

    /// Clears `f`; returns the flags before.
    #[inline]
    pub fn clear(&self, f: FrameFlags) -> FrameFlags {
        // AcqRel: pairs with `set` and `flags()`.
        FrameFlags(self.flags.fetch_and(!f.0, Ordering::AcqRel))
    }

    /// Takes the frame lock (PG_locked) if it is free.
    #[inline]
    pub fn try_lock(&self) -> bool {
        !self.set(FrameFlags::LOCKED).contains(FrameFlags::LOCKED)
    }

    /// Releases the frame lock.
    #[inline]
    pub fn unlock(&self) {
        let was = self.clear(FrameFlags::LOCKED);
        debug_assert!(
            was.contains(FrameFlags::LOCKED),
            "unlocking an unlocked frame"
        );
    }

    /// References now.
    #[inline]
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }

    /// Adds a reference; returns the count after.
    #[inline]
    pub fn get(&self) -> u32 {
        // Relaxed is enough to take a reference from one already held (as Arc does).
        self.refcount.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a reference unless the count is zero (the frame is being freed); returns
    /// whether it did (Linux `get_page_unless_zero`).
    #[inline]
    pub fn get_unless_zero(&self) -> bool {
        // Acquire on success: pairs with the AcqRel of `put`, so the new holder sees the
        // frame as its last releaser left it.
        self.refcount
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| {
                (c > 0).then_some(c + 1)
            })
            .is_ok()
    }

    /// Drops a reference; returns the count after (0: the caller frees the frame).
    #[inline]
    pub fn put(&self) -> u32 {
        // AcqRel: the thread that drops the last reference must see every write made
        // under the other references before it frees the frame (as Arc::drop).
        let before = self.refcount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "frame refcount underflow");
        before - 1
    }

    /// Records the charge the frame's new owner pays (before the frame is mapped).
    #[inline]
    pub(crate) fn set_charge(&self, id: u32) {
        // Relaxed: read back only by whoever frees the frame, which synchronises with
        // this thread through the refcount (`put` is AcqRel).
        self.charge.store(id, Ordering::Relaxed);
    }

    /// Takes the frame's charge id (0: none) as it is freed.
    /// The charge the frame is billed to (0: none).
    #[inline]
    pub(crate) fn charge_id(&self) -> u32 {
        // Relaxed: a hint for reclaim's per-VM filter; set once when the frame is
        // allocated, before it is mapped.
        self.charge.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn take_charge(&self) -> u32 {
        self.charge.swap(0, Ordering::Relaxed)
    }

    /// Mappings now.
    #[inline]
    pub fn mapcount(&self) -> u32 {
        self.mapcount.load(Ordering::Acquire)
    }

    /// Adds a mapping; returns the count after.
    #[inline]
    pub fn map(&self) -> u32 {
        // AcqRel: pairs with the Acquire in `mapcount()` (COW reuse checks mapcount == 1).
        self.mapcount.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Drops a mapping; returns the count after.
    #[inline]
    pub fn unmap(&self) -> u32 {
        // AcqRel: pairs with `map` and `mapcount()`.
        let before = self.mapcount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "frame mapcount underflow");
        before - 1
    }

    /// The raw rmap link and index.
    #[inline]
    pub fn rmap_link(&self) -> (usize, u64) {
        (
            self.mapping.load(Ordering::Acquire),
            self.index.load(Ordering::Acquire),
        )
    }

    /// Replaces the raw rmap link; returns the old raw link (for the caller to release).
    #[inline]
    pub fn set_rmap_link(&self, mapping: usize, index: u64) -> usize {
        // Release: pairs with the Acquire in `rmap_link` of a walker that found the frame
        // through a page table; the index is stored first so the pair is never torn the
        // other way round for a reader that sees the new mapping.
        self.index.store(index, Ordering::Release);
        self.mapping.swap(mapping, Ordering::AcqRel)
    }

    /// Resets a frame that an allocator hands out: one reference, no mappings, ALLOCATED
    /// set and KNOWN_ZERO consumed. Returns the flags before, so that the caller knows
    /// whether the frame was zero. One atomic read-modify-write on the hot path; a second
    /// only for a frame that was known to be zero.
    pub(crate) fn prep_new(&self) -> FrameFlags {
        let before = self.set(FrameFlags::ALLOCATED);
        debug_assert!(
            !before.contains(FrameFlags::ALLOCATED),
            "frame handed out twice: {before:?}"
        );
        if before.contains(FrameFlags::KNOWN_ZERO) {
            // The new owner writes it: it is zero no more.
            self.clear(FrameFlags::KNOWN_ZERO);
        }
        self.refcount.store(1, Ordering::Relaxed);
        self.mapcount.store(0, Ordering::Relaxed);
        before
    }

    /// Marks a frame free again (called by the node before it goes back to an allocator).
    pub(crate) fn prep_free(&self) {
        // Keep only KNOWN_ZERO and UNBACKED (set by whoever knows the contents are zero or
        // returned to the host); this clears ALLOCATED too, in one atomic read-modify-write.
        // AcqRel: as `clear`.
        let before = FrameFlags(self.flags.fetch_and(
            FrameFlags::KNOWN_ZERO.0 | FrameFlags::UNBACKED.0,
            Ordering::AcqRel,
        ));
        debug_assert!(
            before.contains(FrameFlags::ALLOCATED),
            "frame freed twice: {before:?}"
        );
        debug_assert_eq!(self.mapcount(), 0, "freeing a mapped frame");
        self.mapping.store(0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lock_bit_is_exclusive() {
        let f = Frame::default();
        assert!(f.try_lock());
        assert!(!f.try_lock());
        f.unlock();
        assert!(f.try_lock());
    }

    #[test]
    fn refcount_and_mapcount_count_up_and_down() {
        let f = Frame::default();
        f.prep_new();
        assert_eq!(f.get(), 2);
        assert_eq!(f.map(), 1);
        assert_eq!(f.unmap(), 0);
        assert_eq!(f.put(), 1);
        assert_eq!(f.put(), 0);
    }

    #[test]
    fn prep_free_keeps_only_known_zero() {
        let f = Frame::default();
        f.prep_new();
        f.set(FrameFlags::DIRTY | FrameFlags::KNOWN_ZERO | FrameFlags::ACTIVE);
        f.prep_free();
        assert_eq!(f.flags(), FrameFlags::KNOWN_ZERO);
    }

    #[test]
    fn flags_debug_names_bits() {
        let s = format!("{:?}", FrameFlags::LOCKED | FrameFlags::DIRTY);
        assert_eq!(s, "FrameFlags(locked|dirty)");
    }
}
