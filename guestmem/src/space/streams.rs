//! First-touch runs that grow while a guest fills its memory in order: the fault-around
//! run of a zero-fill fault that starts right where an earlier run of the VM ended may
//! be twice that run, up to 2 MiB (a block), as readahead grows its window on a
//! sequential stream. A fault anywhere else gets the configured fault-around
//! (`ManagerConfig::fault_around`), so scattered first touches allocate no more than
//! before. Up to [`STREAMS`] streams are followed at once (one per vCPU filling its own
//! slice); the hints are only hints: racing faults may overwrite one another's.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::pagetable::PTES_PER_BLOCK;
use crate::types::Gfn;

/// Streams followed at once.
pub(super) const STREAMS: usize = 4;
/// The largest order a grown run reaches: a page-table block.
const MAX_ORDER: u32 = PTES_PER_BLOCK.trailing_zeros();

/// Per VM: for each stream, the gfn just after its last run and that run's order.
#[derive(Debug, Default)]
pub(super) struct Streams {
    slots: [AtomicU64; STREAMS],
    next: AtomicU32,
}

fn pack(end: Gfn, order: u32) -> u64 {
    end.0 << 8 | u64::from(order)
}

fn unpack(v: u64) -> (Gfn, u32) {
    (Gfn(v >> 8), (v & 0xff) as u32)
}

impl Streams {
    /// The stream a fault at `gfn` continues, if any.
    fn find(&self, gfn: Gfn) -> Option<(usize, u32)> {
        // Relaxed: hints.
        self.slots.iter().enumerate().find_map(|(i, s)| {
            let (end, order) = unpack(s.load(Ordering::Relaxed));
            (end == gfn && gfn.0 != 0).then_some((i, order))
        })
    }

    /// The largest order a zero-fill fault at `gfn` may try: one more than the run that
    /// ended at `gfn` (at most a block), else `base`. `base` 0 (fault-around off) stays 0.
    pub(super) fn max_order(&self, gfn: Gfn, base: u32) -> u32 {
        if base == 0 {
            return 0;
        }
        match self.find(gfn) {
            Some((_, order)) => (order + 1).clamp(base, MAX_ORDER.max(base)),
            None => base,
        }
    }

    /// Records that a fault at `gfn` mapped a run of `2^order` pages ending before `end`:
    /// the stream it continued, or a new one in place of the oldest.
    pub(super) fn record(&self, gfn: Gfn, end: Gfn, order: u32) {
        let i = match self.find(gfn) {
            Some((i, _)) => i,
            None => self.next.fetch_add(1, Ordering::Relaxed) as usize % STREAMS,
        };
        self.slots[i].store(pack(end, order), Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_stream_grows_its_runs_to_a_block_and_a_jump_starts_again() {
        let s = Streams::default();
        assert_eq!(s.max_order(Gfn(1000), 6), 6);
        s.record(Gfn(1000), Gfn(1024), 6);
        assert_eq!(s.max_order(Gfn(1024), 6), 7);
        s.record(Gfn(1024), Gfn(1152), 7);
        assert_eq!(s.max_order(Gfn(1152), 6), 8);
        s.record(Gfn(1152), Gfn(1408), 8);
        s.record(Gfn(1408), Gfn(1920), 9);
        assert_eq!(s.max_order(Gfn(1920), 6), 9, "at most a block");
        assert_eq!(s.max_order(Gfn(5000), 6), 6, "elsewhere: the base");
        assert_eq!(s.max_order(Gfn(1920), 0), 0, "fault-around off stays off");
    }

    #[test]
    fn four_streams_are_followed_at_once() {
        let s = Streams::default();
        for k in 0..4u64 {
            s.record(Gfn(k * 100_000), Gfn(k * 100_000 + 64), 6);
        }
        for k in 0..4u64 {
            assert_eq!(s.max_order(Gfn(k * 100_000 + 64), 6), 7, "stream {k}");
        }
        // A fifth stream takes the oldest slot.
        s.record(Gfn(900_000), Gfn(900_064), 6);
        assert_eq!(s.max_order(Gfn(64), 6), 6);
        assert_eq!(s.max_order(Gfn(900_064), 6), 7);
    }
}
