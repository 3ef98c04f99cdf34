//! Multi-thread stress test of the three allocator designs through the frame pool.
//!
//! 2 to 4 threads allocate and free at random: single frames and runs of order 1 to 3,
//! freed by the thread that allocated them or passed through a mailbox to another thread
//! that frees them. Invariants checked:
//!
//! - **No frame has two owners.** A shared ownership bitmap is set with an atomic swap
//!   when a frame reaches an owner and cleared when it leaves; a frame handed out while
//!   someone holds it finds its bit set.
//! - **Old bytes never reach a new owner.** Every owner fills its frames with a signature
//!   byte; a frame allocated with [`FrameInit::Zeroed`] must read all zero, and a frame
//!   must still hold its owner's signature when the owner frees it (no one else wrote it).
//! - **Conservation.** At the end every frame is free (`free_frames() == total_frames()`),
//!   every ownership bit is clear, and after returning the free memory to the host the
//!   zone hands out every frame again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::{
    AllocatorKind, FrameInit, NodeConfig, NodeId, Order, PAGE_SIZE, Pfn, Pool, PoolConfig,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const FRAMES: u32 = 4096;
const OPS_PER_THREAD: usize = 8000;
/// Frames a thread keeps at most before it frees some.
const MAX_HELD: usize = 48;

/// A run held by a thread: its first frame, order and the byte it was filled with.
#[derive(Debug, Clone, Copy)]
struct Held {
    pfn: Pfn,
    order: Order,
    sig: u8,
}

struct Shared {
    pool: Pool,
    owned: Vec<AtomicBool>,
    /// Runs passed to thread `i`, which frees them.
    mailboxes: Vec<Mutex<Vec<Held>>>,
    zero_page: Vec<u8>,
}

impl Shared {
    fn bytes(&self, h: Held) -> &[u8] {
        let len = h.order.frames() as usize * PAGE_SIZE;
        // SAFETY: the run is `order.frames()` contiguous frames of one node, so the
        // direct map holds `len` bytes from its first frame; the caller owns the run, so
        // no one else writes it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.pool.page_ptr(h.pfn), len) }
    }

    fn take_ownership(&self, h: Held) {
        for i in 0..h.order.frames() {
            let was = self.owned[h.pfn.offset(i).index()].swap(true, Ordering::AcqRel);
            assert!(!was, "{:?} handed to a second owner", h.pfn.offset(i));
        }
    }

    fn give_up_ownership(&self, h: Held) {
        for i in 0..h.order.frames() {
            let was = self.owned[h.pfn.offset(i).index()].swap(false, Ordering::AcqRel);
            assert!(was, "{:?} freed by a non-owner", h.pfn.offset(i));
        }
    }

    /// Allocates a run, checks it arrived zeroed and unowned, and fills it with `sig`.
    fn alloc(&self, order: Order, sig: u8) -> Option<Held> {
        let pfn = match self.pool.alloc(NodeId(0), order, FrameInit::Zeroed) {
            Ok(p) => p,
            Err(e) => {
                assert!(
                    order.get() > 0,
                    "order-0 allocation failed in a roomy pool: {e}"
                );
                return None;
            }
        };
        let h = Held { pfn, order, sig };
        self.take_ownership(h);
        assert_eq!(self.pool.frame(pfn).refcount(), 1, "{pfn:?} not reset");
        for page in self.bytes(h).chunks(PAGE_SIZE) {
            assert!(
                page == &self.zero_page[..],
                "{pfn:?} reached its new owner with old bytes"
            );
        }
        // SAFETY: we own the run (its ownership bits are ours) and the pointer covers it.
        unsafe { std::ptr::write_bytes(self.pool.page_ptr(pfn), sig, self.bytes(h).len()) };
        Some(h)
    }

    /// Checks the run still holds its signature and frees it.
    fn free(&self, h: Held) {
        assert!(
            self.bytes(h).iter().all(|&b| b == h.sig),
            "{:?} was written by someone else while owned",
            h.pfn
        );
        self.give_up_ownership(h);
        self.pool.free(h.pfn, h.order);
    }
}

fn worker(shared: &Shared, me: usize, threads: usize, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut held: Vec<Held> = Vec::new();
    for op in 0..OPS_PER_THREAD {
        // Free whatever other threads passed to us.
        if op % 8 == 0 {
            let mail = std::mem::take(&mut *shared.mailboxes[me].lock().expect("mailbox"));
            for h in mail {
                shared.free(h);
            }
        }
        let alloc = held.is_empty() || (held.len() < MAX_HELD && rng.random_bool(0.55));
        if alloc {
            let order = if rng.random_ratio(1, 16) {
                Order::new(rng.random_range(1..=3)).expect("order <= 3")
            } else {
                Order::ZERO
            };
            let sig = ((me * 61 + op) % 255) as u8 + 1;
            if let Some(h) = shared.alloc(order, sig) {
                held.push(h);
            }
        } else {
            let h = held.swap_remove(rng.random_range(0..held.len()));
            if rng.random_bool(0.3) {
                // Pass it to another thread, which frees it later (a free of a frame
                // another thread allocated). Ownership moves with it.
                let to = (me + rng.random_range(1..threads)) % threads;
                shared.mailboxes[to].lock().expect("mailbox").push(h);
            } else if rng.random_bool(0.1) && h.order == Order::ZERO {
                // A VM exiting: free a batch at once.
                let mut batch = vec![h];
                held.retain(|x| {
                    let take = x.order == Order::ZERO && batch.len() < 16;
                    if take {
                        batch.push(*x);
                    }
                    !take
                });
                for &x in &batch {
                    assert!(shared.bytes(x).iter().all(|&b| b == x.sig));
                    shared.give_up_ownership(x);
                }
                let pfns: Vec<Pfn> = batch.iter().map(|x| x.pfn).collect();
                shared.pool.free_batch(&pfns);
            } else {
                shared.free(h);
            }
        }
    }
    for h in held {
        shared.free(h);
    }
}

fn stress(kind: AllocatorKind, threads: usize) {
    let pool = Pool::new(&PoolConfig {
        nodes: vec![NodeConfig {
            frames: u64::from(FRAMES),
            host_node: None,
        }],
        allocator: kind,
    })
    .expect("pool");
    let shared = Shared {
        owned: (0..pool.total_frames())
            .map(|_| AtomicBool::new(false))
            .collect(),
        pool,
        mailboxes: (0..threads).map(|_| Mutex::new(Vec::new())).collect(),
        zero_page: vec![0; PAGE_SIZE],
    };
    std::thread::scope(|s| {
        for me in 0..threads {
            let shared = &shared;
            s.spawn(move || {
                worker(
                    shared,
                    me,
                    threads,
                    0x5eed + me as u64 * 7919 + threads as u64,
                )
            });
        }
    });
    // Runs still in mailboxes after their addressee finished.
    for mailbox in &shared.mailboxes {
        for h in mailbox.lock().expect("mailbox").drain(..) {
            shared.free(h);
        }
    }

    let pool = &shared.pool;
    assert_eq!(
        pool.free_frames(),
        pool.total_frames(),
        "{kind:?}/{threads}: frames lost"
    );
    assert!(
        shared.owned.iter().all(|o| !o.load(Ordering::Acquire)),
        "{kind:?}/{threads}: a frame is still owned"
    );
    // Every frame can be handed out again, each once, and reads zero.
    pool.release_free_memory().expect("punch free memory");
    let all: Vec<Pfn> = (0..pool.total_frames())
        .map(|_| {
            pool.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed)
                .expect("every frame is free")
        })
        .collect();
    assert!(
        pool.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed)
            .is_err()
    );
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        all.len(),
        "{kind:?}/{threads}: a frame handed out twice"
    );
    pool.free_batch(&all);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn magazine_conserves_frames_and_never_leaks_bytes_under_threads() {
    for threads in 2..=4 {
        stress(AllocatorKind::Magazine, threads);
    }
}

#[test]
fn percpu_conserves_frames_and_never_leaks_bytes_under_threads() {
    for threads in 2..=4 {
        stress(AllocatorKind::PerCpuLists, threads);
    }
}

#[test]
fn global_lock_conserves_frames_and_never_leaks_bytes_under_threads() {
    for threads in 2..=4 {
        stress(AllocatorKind::GlobalLock, threads);
    }
}
