//! Per-VM frame charges, limits and reservations: this manager's memory cgroup.
//!
//! Every frame a VM allocates is charged to that VM's [`Charge`] until the frame is
//! freed, whoever frees it: a frame a clone still shares after its parent exited stays
//! charged to the parent (as a memory cgroup keeps a page charged to the cgroup that
//! faulted it in). A charge may have a limit (`memory.max`): an allocation that would
//! pass it fails for that VM alone, with [`ChargeError::Limit`]. A reservation sets
//! frames of the pool aside for one VM: no other VM's allocation can take them, so a
//! clone forked with a reservation of `n` frames can copy `n` pages whatever its
//! siblings do.
//!
//! The manager keeps one count, `committed`: frames charged to VMs plus frames reserved
//! and not yet used, never more than the pool holds. An allocation outside a
//! reservation must fit under it; one inside a reservation was counted when the
//! reservation was made. So the frames of every reservation stay free in the pool.
//!
//! Cost: one atomic update of the VM's charge and one of `committed` per allocation
//! (a 64-page fault-around run is one), and one table lookup per batch of frees.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::types::VmId;

/// An allocation refused by the accounting (the pool itself was not asked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    /// The VM is at its limit.
    #[error(
        "{vm} is at its memory limit: {usage} of {limit} frames charged and {frames} more asked for; raise its limit or let it touch less memory"
    )]
    Limit {
        /// The VM.
        vm: VmId,
        /// Frames charged to it.
        usage: u64,
        /// Its limit.
        limit: u64,
        /// Frames asked for.
        frames: u64,
    },
    /// What is free in the pool is reserved for other VMs.
    #[error(
        "the pool's free frames are reserved for other VMs: {frames} frame(s) asked for by {vm}, {available} of {total} neither used nor reserved; reserve less per clone or give the pool more memory"
    )]
    Reserved {
        /// The VM.
        vm: VmId,
        /// Frames asked for.
        frames: u64,
        /// Frames neither charged nor reserved.
        available: u64,
        /// Frames in the pool.
        total: u64,
    },
    /// A reservation could not be made: not enough frames are unclaimed.
    #[error(
        "cannot reserve {frames} frames for {vm}: only {available} of the pool's {total} are neither used nor reserved; reserve less or give the pool more memory"
    )]
    Reserve {
        /// The VM.
        vm: VmId,
        /// Frames asked for.
        frames: u64,
        /// Frames neither charged nor reserved.
        available: u64,
        /// Frames in the pool.
        total: u64,
    },
}

/// One VM's frame account.
#[derive(Debug)]
pub struct Charge {
    id: u32,
    vm: VmId,
    /// Frames charged (allocated by this VM and not yet freed by anyone).
    usage: AtomicU64,
    /// Most frames it may have charged (`u64::MAX`: no limit).
    limit: AtomicU64,
    /// Frames of the pool set aside for it and not yet used.
    reserved: AtomicU64,
    /// Allocations refused by the limit.
    failcnt: AtomicU64,
    /// Its VM has exited: the charge goes when its last frame is freed.
    exited: AtomicBool,
    removed: AtomicBool,
}

/// A charge as [`Charge::snapshot`] reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChargeSnapshot {
    /// Frames charged.
    pub usage: u64,
    /// The limit, if any.
    pub limit: Option<u64>,
    /// Frames reserved and not yet used.
    pub reserved: u64,
    /// Allocations refused by the limit.
    pub failcnt: u64,
}

impl Charge {
    /// The charge id that frames record.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its numbers now.
    pub fn snapshot(&self) -> ChargeSnapshot {
        let limit = self.limit.load(Ordering::Relaxed);
        ChargeSnapshot {
            usage: self.usage.load(Ordering::Relaxed),
            limit: (limit != u64::MAX).then_some(limit),
            reserved: self.reserved.load(Ordering::Relaxed),
            failcnt: self.failcnt.load(Ordering::Relaxed),
        }
    }

    /// Sets or clears the limit. A limit below the usage refuses every further
    /// allocation until frames are freed; nothing already charged is taken away.
    pub fn set_limit(&self, frames: Option<u64>) {
        self.limit
            .store(frames.unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// How an allocation was paid for, to undo it if the pool then fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Paid {
    /// Out of the VM's reservation.
    Reserved,
    /// Out of the pool's unclaimed frames.
    Unclaimed,
}

#[derive(Debug, Default)]
struct Table {
    /// Index = id - 1.
    slots: Vec<Option<Arc<Charge>>>,
    free: Vec<u32>,
}

/// Every charge of a manager, and the pool-wide commitment.
#[derive(Debug)]
pub(crate) struct Charges {
    /// Frames in the pool.
    total: u64,
    /// Frames charged plus frames reserved and unused.
    committed: AtomicU64,
    /// Frames reserved and unused, in all (to tell "reserved" from "exhausted").
    reserved: AtomicU64,
    table: RwLock<Table>,
}

impl Charges {
    pub(crate) fn new(total: u64) -> Charges {
        Charges {
            total,
            committed: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            table: RwLock::new(Table::default()),
        }
    }

    /// A new charge for `vm`, with `limit`.
    pub(crate) fn register(&self, vm: VmId, limit: Option<u64>) -> Arc<Charge> {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let id = match t.free.pop() {
            Some(id) => id,
            None => {
                t.slots.push(None);
                // Ids are 1-based (0 means "not charged"); a u32 overflow would need four
                // billion live charges, each a live or exited VM with frames.
                u32::try_from(t.slots.len()).unwrap_or(u32::MAX)
            }
        };
        let c = Arc::new(Charge {
            id,
            vm,
            usage: AtomicU64::new(0),
            limit: AtomicU64::new(limit.unwrap_or(u64::MAX)),
            reserved: AtomicU64::new(0),
            failcnt: AtomicU64::new(0),
            exited: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        });
        t.slots[id as usize - 1] = Some(Arc::clone(&c));
        c
    }

    /// Frames neither charged nor reserved.
    pub(crate) fn available(&self) -> u64 {
        self.total
            .saturating_sub(self.committed.load(Ordering::Relaxed))
    }

    /// Charges `frames` to `c` before they are allocated.
    pub(crate) fn try_charge(&self, c: &Charge, frames: u64) -> Result<Paid, ChargeError> {
        if let Err(usage) = c
            .usage
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                let limit = c.limit.load(Ordering::Relaxed);
                u.checked_add(frames).filter(|&n| n <= limit)
            })
        {
            c.failcnt.fetch_add(1, Ordering::Relaxed);
            return Err(ChargeError::Limit {
                vm: c.vm,
                usage,
                limit: c.limit.load(Ordering::Relaxed),
                frames,
            });
        }
        if c.reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                r.checked_sub(frames)
            })
            .is_ok()
        {
            self.reserved.fetch_sub(frames, Ordering::Relaxed);
            return Ok(Paid::Reserved);
        }
        let total = self.total;
        match self
            .committed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(frames).filter(|&m| m <= total)
            }) {
            Ok(_) => Ok(Paid::Unclaimed),
            Err(committed) => {
                c.usage.fetch_sub(frames, Ordering::Relaxed);
                Err(ChargeError::Reserved {
                    vm: c.vm,
                    frames,
                    available: total.saturating_sub(committed),
                    total,
                })
            }
        }
    }

    /// Whether any frames are reserved now (an accounting refusal then means "reserved
    /// for others", else the pool is simply full).
    pub(crate) fn any_reserved(&self) -> bool {
        self.reserved.load(Ordering::Relaxed) > 0
    }

    /// Undoes [`Charges::try_charge`] when the pool could not supply the frames.
    pub(crate) fn cancel(&self, c: &Charge, frames: u64, paid: Paid) {
        c.usage.fetch_sub(frames, Ordering::Relaxed);
        match paid {
            Paid::Reserved => {
                c.reserved.fetch_add(frames, Ordering::Relaxed);
                self.reserved.fetch_add(frames, Ordering::Relaxed);
            }
            Paid::Unclaimed => {
                self.committed.fetch_sub(frames, Ordering::Relaxed);
            }
        }
    }

    /// Adds `frames` to `c`'s reservation, out of the unclaimed frames.
    pub(crate) fn reserve(&self, c: &Charge, frames: u64) -> Result<(), ChargeError> {
        let total = self.total;
        self.committed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(frames).filter(|&m| m <= total)
            })
            .map_err(|committed| ChargeError::Reserve {
                vm: c.vm,
                frames,
                available: total.saturating_sub(committed),
                total,
            })?;
        c.reserved.fetch_add(frames, Ordering::Relaxed);
        self.reserved.fetch_add(frames, Ordering::Relaxed);
        Ok(())
    }

    /// Returns what is left of `c`'s reservation to the pool.
    pub(crate) fn unreserve(&self, c: &Charge) {
        let r = c.reserved.swap(0, Ordering::Relaxed);
        self.reserved.fetch_sub(r, Ordering::Relaxed);
        self.committed.fetch_sub(r, Ordering::Relaxed);
    }

    /// `c`'s VM has exited: its reservation goes back, and the charge itself goes once
    /// its last frame is freed.
    pub(crate) fn exit(&self, c: &Arc<Charge>) {
        self.unreserve(c);
        // SeqCst with the one in `uncharge`: either this sees the usage at 0, or the
        // last uncharge sees `exited` (both may, and `remove` acts once).
        c.exited.store(true, Ordering::SeqCst);
        if c.usage.load(Ordering::SeqCst) == 0 {
            self.remove(c);
        }
    }

    /// Uncharges freed frames: `ids[i]` is the charge id each frame recorded.
    pub(crate) fn uncharge(&self, ids: impl IntoIterator<Item = u32>) {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut last: Option<(u32, u64)> = None;
        let mut empty = Vec::new();
        let flush = |id: u32, n: u64, empty: &mut Vec<Arc<Charge>>| {
            self.committed.fetch_sub(n, Ordering::Relaxed);
            let Some(Some(c)) = t.slots.get(id as usize - 1) else {
                debug_assert!(false, "frame charged to unknown charge {id}");
                return;
            };
            let before = c.usage.fetch_sub(n, Ordering::SeqCst);
            debug_assert!(before >= n, "charge {id} underflow");
            if before == n && c.exited.load(Ordering::SeqCst) {
                empty.push(Arc::clone(c));
            }
        };
        for id in ids.into_iter().filter(|&id| id != 0) {
            last = match last {
                Some((l, n)) if l == id => Some((l, n + 1)),
                Some((l, n)) => {
                    flush(l, n, &mut empty);
                    Some((id, 1))
                }
                None => Some((id, 1)),
            };
        }
        if let Some((l, n)) = last {
            flush(l, n, &mut empty);
        }
        drop(t);
        for c in empty {
            self.remove(&c);
        }
    }

    /// Drops `c` from the table, once (its id may already name a newer charge).
    fn remove(&self, c: &Arc<Charge>) {
        if c.removed.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = t.slots.get_mut(c.id as usize - 1) else {
            return;
        };
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, c)) {
            *slot = None;
            t.free.push(c.id);
        }
    }

    /// Charges alive (their VM running, or exited with frames still charged).
    pub(crate) fn live(&self) -> usize {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.slots.iter().filter(|s| s.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_what_would_pass_it_and_counts_the_refusal() {
        let cs = Charges::new(100);
        let c = cs.register(VmId(1), Some(10));
        let p = cs.try_charge(&c, 8).unwrap();
        assert_eq!(p, Paid::Unclaimed);
        let e = cs.try_charge(&c, 4).unwrap_err();
        assert!(
            matches!(
                e,
                ChargeError::Limit {
                    usage: 8,
                    limit: 10,
                    frames: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(c.snapshot().failcnt, 1);
        assert_eq!(cs.try_charge(&c, 2).unwrap(), Paid::Unclaimed);
        cs.uncharge(std::iter::repeat_n(c.id(), 10));
        assert_eq!(c.snapshot().usage, 0);
        assert_eq!(cs.available(), 100);
    }

    #[test]
    fn a_reservation_keeps_its_frames_from_everyone_else() {
        let cs = Charges::new(100);
        let a = cs.register(VmId(1), None);
        let b = cs.register(VmId(2), None);
        cs.reserve(&a, 60).unwrap();
        assert!(matches!(
            cs.reserve(&b, 41),
            Err(ChargeError::Reserve { available: 40, .. })
        ));
        assert_eq!(cs.try_charge(&b, 40).unwrap(), Paid::Unclaimed);
        let e = cs.try_charge(&b, 1).unwrap_err();
        assert!(
            matches!(e, ChargeError::Reserved { available: 0, .. }),
            "{e}"
        );
        assert_eq!(c_usage(&b), 40, "a refused charge is undone");
        // `a` can use all 60 of its frames, then no more.
        for _ in 0..60 {
            assert_eq!(cs.try_charge(&a, 1).unwrap(), Paid::Reserved);
        }
        assert!(cs.try_charge(&a, 1).is_err());
        // A cancelled allocation gives the reserved frame back to `a`, not to `b`.
        cs.cancel(&a, 1, Paid::Reserved);
        assert!(cs.try_charge(&b, 1).is_err());
        assert_eq!(cs.try_charge(&a, 1).unwrap(), Paid::Reserved);
    }

    #[test]
    fn an_exited_vms_charge_goes_with_its_last_frame_and_its_id_is_reused() {
        let cs = Charges::new(100);
        let a = cs.register(VmId(1), None);
        cs.reserve(&a, 10).unwrap();
        let _ = cs.try_charge(&a, 3).unwrap();
        cs.exit(&a);
        assert_eq!(
            cs.available(),
            97,
            "the unused reservation went back at exit"
        );
        assert_eq!(cs.live(), 1, "frames still charged keep the charge");
        cs.uncharge([a.id(), 0, a.id()]);
        assert_eq!(cs.live(), 1);
        cs.uncharge([a.id()]);
        assert_eq!(cs.live(), 0);
        assert_eq!(cs.available(), 100);
        let b = cs.register(VmId(2), None);
        assert_eq!(b.id(), a.id());
        cs.exit(&b);
        assert_eq!(cs.live(), 0, "a charge with nothing charged goes at exit");
    }

    fn c_usage(c: &Charge) -> u64 {
        c.snapshot().usage
    }
}
