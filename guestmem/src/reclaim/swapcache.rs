//! The swap cache: frames whose contents a swap slot holds or is about to hold.
//!
//! A frame is in the cache while swap entries naming its slot may still be resolved to
//! it without I/O: from the moment reclaim decides to swap it out (its entries become
//! swap entries before its contents are written) until it is freed, and after a swap-in
//! for as long as the slot is kept (its copy on disk stays valid while no one writes the
//! frame, so reclaiming it again costs no I/O).
//!
//! The cache holds one frame reference and one slot reference for each frame in it.
//! Every frame in the cache is mapped read-only wherever it is mapped: a write first
//! takes the frame out of the cache (dropping the slot) or copies it, so a cached frame
//! never differs from what its slot's entries should read.
//!
//! One lock (a leaf) protects the two maps; [`FrameFlags::SWAPCACHE`] mirrors membership
//! and changes only under it.
//!
//! [`FrameFlags::SWAPCACHE`]: crate::frame::FrameFlags::SWAPCACHE

use std::collections::HashMap;

use crate::sync::{Mutex, MutexGuard};
use crate::types::Pfn;

use super::swap::SwapSlot;

/// What a cached frame's contents are, relative to its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// Being read from the slot: the frame's contents are not valid yet.
    Reading,
    /// Valid in the frame, not (yet, or not successfully) written to the slot: the frame
    /// must stay in the cache until it is.
    Unwritten,
    /// Valid in the frame and the same in the slot.
    Clean,
}

/// One cached frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheEntry {
    /// The frame.
    pub pfn: Pfn,
    /// Its contents' state.
    pub state: CacheState,
}

/// The maps, under the cache lock.
#[derive(Debug, Default)]
pub struct CacheMaps {
    by_slot: HashMap<SwapSlot, CacheEntry>,
    by_pfn: HashMap<Pfn, SwapSlot>,
}

impl CacheMaps {
    /// The frame cached for `slot`.
    pub fn get(&self, slot: SwapSlot) -> Option<CacheEntry> {
        self.by_slot.get(&slot).copied()
    }

    /// The slot `pfn` is cached for.
    pub fn slot_of(&self, pfn: Pfn) -> Option<SwapSlot> {
        self.by_pfn.get(&pfn).copied()
    }

    /// Caches `pfn` for `slot`; false (nothing changed) if `slot` already has a frame.
    pub fn insert(&mut self, slot: SwapSlot, pfn: Pfn, state: CacheState) -> bool {
        if self.by_slot.contains_key(&slot) {
            return false;
        }
        debug_assert!(!self.by_pfn.contains_key(&pfn), "a frame cached twice");
        self.by_slot.insert(slot, CacheEntry { pfn, state });
        self.by_pfn.insert(pfn, slot);
        true
    }

    /// Changes the state of `slot`'s frame.
    pub fn set_state(&mut self, slot: SwapSlot, state: CacheState) {
        if let Some(e) = self.by_slot.get_mut(&slot) {
            e.state = state;
        }
    }

    /// Takes `slot`'s frame out of the cache.
    pub fn remove(&mut self, slot: SwapSlot) -> Option<CacheEntry> {
        let e = self.by_slot.remove(&slot)?;
        self.by_pfn.remove(&e.pfn);
        Some(e)
    }

    /// Frames in the cache.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

/// The swap cache (see the module docs).
#[derive(Debug, Default)]
pub struct SwapCache {
    maps: Mutex<CacheMaps>,
}

impl SwapCache {
    /// Locks the cache.
    pub fn lock(&self) -> MutexGuard<'_, CacheMaps> {
        crate::sync::lock(&self.maps)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn both_maps_follow_inserts_and_removals() {
        let c = SwapCache::default();
        let mut m = c.lock();
        assert!(m.insert(SwapSlot(3), Pfn(9), CacheState::Reading));
        assert!(!m.insert(SwapSlot(3), Pfn(10), CacheState::Clean));
        assert_eq!(m.slot_of(Pfn(9)), Some(SwapSlot(3)));
        m.set_state(SwapSlot(3), CacheState::Clean);
        assert_eq!(m.get(SwapSlot(3)).map(|e| e.state), Some(CacheState::Clean));
        assert_eq!(m.remove(SwapSlot(3)).map(|e| e.pfn), Some(Pfn(9)));
        assert_eq!(m.slot_of(Pfn(9)), None);
        assert!(m.is_empty());
    }
}
