//! The LRU lists of one node: an inactive and an active list of the node's resident
//! guest frames, as Linux's per-node anon LRU (`lruvec`).
//!
//! A frame joins the inactive list's head when it is first mapped (zero-fill, copy, swap
//! in) and leaves when it is freed or isolated by reclaim. Reclaim takes frames from
//! the inactive tail; one that was referenced since the last look goes to the active
//! head, an unreferenced one is reclaimed. The active list is aged from its tail into the
//! inactive list when the inactive list gets short (`shrink_active_list`).
//!
//! The lists are intrusive and doubly linked through two arrays indexed by the frame's
//! place in its node, so that add, remove and isolate are O(1) and the frame descriptor
//! stays 32 bytes. [`FrameFlags::LRU`] and [`FrameFlags::ACTIVE`] say where a frame is;
//! both change only under the LRU lock, so a freeing path that sees `LRU` under the lock
//! knows the frame is on a list.

use crate::frame::{Frame, FrameFlags};
use crate::sync::Mutex;
use crate::types::Pfn;

const NIL: u32 = u32::MAX;

/// Which list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LruList {
    /// Not referenced since reclaim last looked (or new).
    Inactive,
    /// Referenced when reclaim last looked.
    Active,
}

impl LruList {
    fn index(self) -> usize {
        match self {
            LruList::Inactive => 0,
            LruList::Active => 1,
        }
    }
}

/// Frames on each list of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LruSizes {
    /// Frames on the inactive list.
    pub inactive: u64,
    /// Frames on the active list.
    pub active: u64,
}

#[derive(Debug)]
struct Lists {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: [u32; 2],
    tail: [u32; 2],
    len: [u64; 2],
}

/// One node's LRU lists (see the module docs). Protected by one lock, a leaf.
#[derive(Debug)]
pub struct Lru {
    /// The node's first frame: list links are indexed by `pfn - base`.
    base: u32,
    /// The lists; the LRU lock.
    lists: Mutex<Lists>,
}

impl Lru {
    /// Empty lists for the `frames` frames from `base`.
    pub fn new(base: Pfn, frames: u32) -> Lru {
        Lru {
            base: base.0,
            lists: Mutex::new(Lists {
                prev: vec![NIL; frames as usize],
                next: vec![NIL; frames as usize],
                head: [NIL; 2],
                tail: [NIL; 2],
                len: [0; 2],
            }),
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Lists> {
        crate::sync::lock(&self.lists)
    }

    /// Adds `pfn` (described by `frame`) to the head of `list` unless it is on one.
    pub fn push(&self, pfn: Pfn, frame: &Frame, list: LruList) {
        let mut l = self.lock();
        if frame.flags().contains(FrameFlags::LRU) {
            return;
        }
        l.push_head(pfn.0 - self.base, list);
        frame.set(if list == LruList::Active {
            FrameFlags::LRU | FrameFlags::ACTIVE
        } else {
            FrameFlags::LRU
        });
    }

    /// Adds a run of frames to the inactive head, under one lock acquisition.
    pub fn push_run<'f>(&self, first: Pfn, frames: impl Iterator<Item = &'f Frame>) {
        let mut l = self.lock();
        for (i, f) in frames.enumerate() {
            if !f.flags().contains(FrameFlags::LRU) {
                l.push_head(first.0 + i as u32 - self.base, LruList::Inactive);
                f.set(FrameFlags::LRU);
            }
        }
    }

    /// Takes `pfn` off its list if it is on one (it is being freed).
    pub fn remove(&self, pfn: Pfn, frame: &Frame) {
        let mut l = self.lock();
        if frame.flags().contains(FrameFlags::LRU) {
            let list = list_of(frame);
            l.unlink(pfn.0 - self.base, list);
            frame.clear(FrameFlags::LRU | FrameFlags::ACTIVE);
        }
    }

    /// Isolates up to `n` frames from the tail of `list` for reclaim: each is taken off
    /// the list with a reference held (`frame(pfn).get_unless_zero()`, under the lock, so
    /// a frame being freed is never isolated). Frames whose refcount is already zero are
    /// dropped from the list (their freeing path will not find them there).
    pub fn isolate<'p>(
        &self,
        list: LruList,
        n: usize,
        frame: impl Fn(Pfn) -> &'p Frame,
        out: &mut Vec<Pfn>,
    ) {
        let mut l = self.lock();
        let li = list.index();
        let mut taken = 0;
        while taken < n {
            let i = l.tail[li];
            if i == NIL {
                break;
            }
            l.unlink(i, list);
            let pfn = Pfn(self.base + i);
            let f = frame(pfn);
            f.clear(FrameFlags::LRU | FrameFlags::ACTIVE);
            if f.get_unless_zero() {
                out.push(pfn);
                taken += 1;
            }
        }
    }

    /// Isolates as [`Lru::isolate`] does from the tail of `list`, and with each frame
    /// taken there the other frames of `list` in its naturally aligned block of `block`
    /// frames (a power of two): lumpy reclaim and aging. Frames allocated together as a
    /// run (fault-around, readahead) then age and are freed together, and merge in the
    /// zone into a run that the next multi-frame request can have. A block with a frame
    /// on the other list is pushed to `busy` (its number, see [`Lru::block_of`]); those
    /// frames stay where they are. Stops once `n` frames are taken, at the end of a
    /// block.
    pub fn isolate_blocks<'p>(
        &self,
        list: LruList,
        n: usize,
        block: u32,
        frame: impl Fn(Pfn) -> &'p Frame,
        out: &mut Vec<Pfn>,
        busy: &mut Vec<u32>,
    ) {
        debug_assert!(block.is_power_of_two());
        let mut l = self.lock();
        let li = list.index();
        let len = l.prev.len() as u32;
        let mut taken = 0;
        while taken < n {
            let i = l.tail[li];
            if i == NIL {
                break;
            }
            let first = i & !(block - 1);
            // The tail frame first, then its block-mates on the inactive list.
            for j in std::iter::once(i).chain((first..(first + block).min(len)).filter(|&j| j != i))
            {
                let pfn = Pfn(self.base + j);
                let f = frame(pfn);
                let flags = f.flags();
                if !flags.contains(FrameFlags::LRU) {
                    continue;
                }
                if list_of(f) != list {
                    if busy.last() != Some(&(j / block)) {
                        busy.push(j / block);
                    }
                    continue;
                }
                l.unlink(j, list);
                f.clear(FrameFlags::LRU | FrameFlags::ACTIVE);
                if f.get_unless_zero() {
                    out.push(pfn);
                    taken += 1;
                }
            }
        }
    }

    /// The naturally aligned block of `block` frames (a power of two) that `pfn` is in,
    /// numbered within the node (the zone's alignment).
    pub fn block_of(&self, pfn: Pfn, block: u32) -> u32 {
        (pfn.0 - self.base) / block
    }

    /// Puts an isolated frame back on `list` (the caller still holds its reference and
    /// drops it afterwards).
    pub fn putback(&self, pfn: Pfn, frame: &Frame, list: LruList) {
        self.push(pfn, frame, list);
    }

    /// The lists' lengths.
    pub fn sizes(&self) -> LruSizes {
        let l = self.lock();
        LruSizes {
            inactive: l.len[0],
            active: l.len[1],
        }
    }
}

fn list_of(frame: &Frame) -> LruList {
    if frame.flags().contains(FrameFlags::ACTIVE) {
        LruList::Active
    } else {
        LruList::Inactive
    }
}

impl Lists {
    fn push_head(&mut self, i: u32, list: LruList) {
        let li = list.index();
        let old = self.head[li];
        self.prev[i as usize] = NIL;
        self.next[i as usize] = old;
        if old == NIL {
            self.tail[li] = i;
        } else {
            self.prev[old as usize] = i;
        }
        self.head[li] = i;
        self.len[li] += 1;
    }

    fn unlink(&mut self, i: u32, list: LruList) {
        let li = list.index();
        let (p, n) = (self.prev[i as usize], self.next[i as usize]);
        if p == NIL {
            self.head[li] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail[li] = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i as usize] = NIL;
        self.next[i as usize] = NIL;
        self.len[li] -= 1;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn frames(n: usize) -> Vec<Frame> {
        (0..n).map(|_| Frame::default()).collect()
    }

    #[test]
    fn isolate_takes_the_oldest_first_and_skips_dying_frames() {
        let fs = frames(8);
        let lru = Lru::new(Pfn(100), 8);
        for (i, f) in fs.iter().enumerate() {
            f.get();
            lru.push(Pfn(100 + i as u32), f, LruList::Inactive);
        }
        assert_eq!(lru.sizes().inactive, 8);
        // Frame 1 is being freed: refcount 0.
        fs[1].put();
        let mut out = Vec::new();
        lru.isolate(
            LruList::Inactive,
            3,
            |p| &fs[(p.0 - 100) as usize],
            &mut out,
        );
        assert_eq!(out, vec![Pfn(100), Pfn(102), Pfn(103)]);
        assert_eq!(lru.sizes().inactive, 4);
        assert!(!fs[1].flags().contains(FrameFlags::LRU));
        assert_eq!(fs[0].refcount(), 2, "isolation holds a reference");
        lru.putback(Pfn(100), &fs[0], LruList::Active);
        assert_eq!(
            lru.sizes(),
            LruSizes {
                inactive: 4,
                active: 1
            }
        );
        lru.remove(Pfn(100), &fs[0]);
        lru.remove(Pfn(107), &fs[7]);
        assert_eq!(
            lru.sizes(),
            LruSizes {
                inactive: 3,
                active: 0
            }
        );
        let mut rest = Vec::new();
        lru.isolate(
            LruList::Inactive,
            10,
            |p| &fs[(p.0 - 100) as usize],
            &mut rest,
        );
        assert_eq!(rest, vec![Pfn(104), Pfn(105), Pfn(106)]);
        assert_eq!(lru.sizes(), LruSizes::default());
    }

    #[test]
    fn a_frame_is_added_once() {
        let fs = frames(2);
        let lru = Lru::new(Pfn(0), 2);
        lru.push_run(Pfn(0), fs.iter());
        lru.push_run(Pfn(0), fs.iter());
        lru.push(Pfn(1), &fs[1], LruList::Active);
        assert_eq!(
            lru.sizes(),
            LruSizes {
                inactive: 2,
                active: 0
            }
        );
    }
}
