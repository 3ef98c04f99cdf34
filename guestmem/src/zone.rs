//! A node's zone: the buddy free structure every allocator takes frames from and returns
//! them to, under the zone lock.
//!
//! Frames are identified here by their index within the node (`u32`). Free blocks of
//! `2^order` naturally aligned frames sit on one intrusive doubly linked list per order
//! (the `next`/`prev` arrays), so that taking a block, splitting it and merging a freed
//! block with its buddy are all O(1) per order, as in Linux's `mm/page_alloc.c`.

use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering};
use crate::types::MAX_ORDER;

const NIL: u32 = u32::MAX;
const NOT_FREE: u8 = u8::MAX;
const ORDERS: usize = MAX_ORDER as usize + 1;

/// The buddy free structure of one node. Protected by the zone lock ([`Zone::lock`]).
#[derive(Debug)]
pub(crate) struct Buddy {
    /// Next free block head on the same order's list, or `NIL`.
    next: Vec<u32>,
    /// Previous free block head on the same order's list, or `NIL`.
    prev: Vec<u32>,
    /// For the head frame of a free block, its order; `NOT_FREE` for every other frame.
    head_order: Vec<u8>,
    /// First block on each order's list.
    heads: [u32; ORDERS],
    /// Free frames in the structure.
    free: u64,
}

impl Buddy {
    /// A structure of `frames` frames, all free.
    fn new(frames: u32) -> Buddy {
        let n = frames as usize;
        let mut b = Buddy {
            next: vec![NIL; n],
            prev: vec![NIL; n],
            head_order: vec![NOT_FREE; n],
            heads: [NIL; ORDERS],
            free: 0,
        };
        // Carve the range into the largest naturally aligned blocks, lowest first, and
        // push them in reverse so that the lowest frames are handed out first.
        let mut blocks = Vec::new();
        let mut i = 0u32;
        while i < frames {
            let mut order = MAX_ORDER;
            while order > 0 && (i % (1 << order) != 0 || i + (1 << order) > frames) {
                order -= 1;
            }
            blocks.push((i, order));
            i += 1 << order;
        }
        for &(i, order) in blocks.iter().rev() {
            b.push(i, order);
        }
        b
    }

    fn push(&mut self, i: u32, order: u32) {
        let o = order as usize;
        let head = self.heads[o];
        self.next[i as usize] = head;
        self.prev[i as usize] = NIL;
        if head != NIL {
            self.prev[head as usize] = i;
        }
        self.heads[o] = i;
        self.head_order[i as usize] = order as u8;
        self.free += 1 << order;
    }

    fn remove(&mut self, i: u32, order: u32) {
        let (n, p) = (self.next[i as usize], self.prev[i as usize]);
        if p == NIL {
            self.heads[order as usize] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.head_order[i as usize] = NOT_FREE;
        self.free -= 1 << order;
    }

    /// Takes a block of `2^order` frames; `None` when no block that large is free.
    pub(crate) fn alloc(&mut self, order: u32) -> Option<u32> {
        let mut o = order;
        while o <= MAX_ORDER && self.heads[o as usize] == NIL {
            o += 1;
        }
        if o > MAX_ORDER {
            return None;
        }
        let i = self.heads[o as usize];
        self.remove(i, o);
        // Split: give the upper halves back, keep the lowest block.
        while o > order {
            o -= 1;
            self.push(i + (1 << o), o);
        }
        Some(i)
    }

    /// Returns a block of `2^order` frames starting at `i`, merging it with free buddies.
    pub(crate) fn free(&mut self, mut i: u32, mut order: u32) {
        debug_assert_eq!(i % (1 << order), 0, "misaligned block");
        debug_assert_eq!(self.head_order[i as usize], NOT_FREE, "block freed twice");
        while order < MAX_ORDER {
            let buddy = i ^ (1 << order);
            if (buddy as usize) >= self.head_order.len()
                || u32::from(self.head_order[buddy as usize]) != order
            {
                break;
            }
            self.remove(buddy, order);
            i = i.min(buddy);
            order += 1;
        }
        self.push(i, order);
    }

    /// Takes the free block `i` of exactly `order` if it is on its list.
    pub(crate) fn take_exact(&mut self, i: u32, order: u32) -> bool {
        if self.head_order.get(i as usize).copied() != Some(order as u8) {
            return false;
        }
        self.remove(i, order);
        true
    }

    /// Free frames.
    pub(crate) fn free_frames(&self) -> u64 {
        self.free
    }

    /// Every free block as `(first frame, order)`.
    pub(crate) fn free_blocks(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for (o, &head) in self.heads.iter().enumerate() {
            let mut i = head;
            while i != NIL {
                out.push((i, o as u32));
                i = self.next[i as usize];
            }
        }
        out
    }
}

/// The zone: the buddy structure under its lock, with a count of lock acquisitions.
#[derive(Debug)]
pub(crate) struct Zone {
    buddy: Mutex<Buddy>,
    /// Zone lock acquisitions (statistics only: Relaxed).
    acquisitions: AtomicU64,
}

impl Zone {
    /// A zone of `frames` free frames.
    pub(crate) fn new(frames: u32) -> Zone {
        Zone {
            buddy: Mutex::new(Buddy::new(frames)),
            acquisitions: AtomicU64::new(0),
        }
    }

    /// Takes the zone lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Buddy> {
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
        crate::sync::lock(&self.buddy)
    }

    /// Zone lock acquisitions so far.
    pub(crate) fn acquisitions(&self) -> u64 {
        self.acquisitions.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn new_zone_holds_every_frame_in_aligned_blocks() {
        let b = Buddy::new(1000);
        assert_eq!(b.free_frames(), 1000);
        let blocks = b.free_blocks();
        let total: u64 = blocks.iter().map(|&(_, o)| 1u64 << o).sum();
        assert_eq!(total, 1000);
        assert!(blocks.iter().all(|&(i, o)| i % (1 << o) == 0));
    }

    #[test]
    fn alloc_splits_and_free_merges_back_to_one_block() {
        let mut b = Buddy::new(512);
        let a = b.alloc(0).unwrap();
        let c = b.alloc(3).unwrap();
        assert_eq!(a, 0);
        assert_eq!(c % 8, 0);
        assert_eq!(b.free_frames(), 512 - 9);
        b.free(a, 0);
        b.free(c, 3);
        assert_eq!(b.free_blocks(), vec![(0, 9)]);
    }

    #[test]
    fn exhaustion_returns_none_and_keeps_count() {
        let mut b = Buddy::new(4);
        let got: Vec<u32> = (0..4).map(|_| b.alloc(0).unwrap()).collect();
        assert_eq!(b.alloc(0), None);
        assert_eq!(b.free_frames(), 0);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }

    #[test]
    fn high_order_fails_when_only_fragments_are_free() {
        let mut b = Buddy::new(8);
        let all: Vec<u32> = (0..8).map(|_| b.alloc(0).unwrap()).collect();
        for i in all.iter().filter(|&&i| i % 2 == 0) {
            b.free(*i, 0);
        }
        assert_eq!(b.free_frames(), 4);
        assert_eq!(b.alloc(1), None);
        assert!(b.alloc(0).is_some());
    }
}
