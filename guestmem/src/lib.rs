//! The guest memory manager.
//!
//! The VMM owns a pool of host frames ([`pool::Pool`]) and decides, page by page, which
//! frame backs which guest page of which VM. This crate is that decision: nodes and
//! frames, the allocators in front of them (seed 5's magazines and its baselines),
//! guest address spaces with their page tables, faults, copy-on-write fork and exit,
//! reverse maps (through the `rmap` crate), reclaim and migration. It works without KVM:
//! an address space can be driven by software accesses, and a [`mmu::HostMmu`] observer
//! mirrors its mappings into KVM guest windows when the VMM plugs one in.
//!
//! # Lock order
//!
//! ```text
//! AddressSpace.mmap_lock (read: faults, accesses, migrate; write: fork, exit, region changes)
//!   Manager.topology RwLock (read: a migration run, before its frame locks; write:
//!     |   every rmap link and unlink: create, fork from sharing a region's blocks to
//!     |   linking its child, exit; space/migrate.rs)
//!   Frame lock bit (FrameFlags::LOCKED: rmap walkers, swap-out and migration;
//!     |            Linux's folio lock: taken before the anon_vma lock)
//!     anon_vma root lock (rmap; write = link/unlink, read = rmap walk)
//!       page-table slot lock (one per 512 gfns; Slot in pagetable.rs)
//!         [frame lock only by try_lock here: COW reuse in write_protect_fault]
//!         [later slots of the same region only by try_lock here: a fault mapping a run
//!          on past its block, space/fault.rs map_existing]
//!         HostMmu calls (the VMM's window: host mmap lock, KVM memslot lock)
//!         swap cache lock (reclaim/swapcache.rs; a leaf but for the two below)
//!           swap device free map (reclaim/swap.rs: a slot's last put)
//!           LRU lock (per node, reclaim/lru.rs: a frame freed under it)
//! charge table RwLock (charge.rs; a leaf: taken inside any of the above, nothing inside it)
//! CPU slot spinlock (magazine / per-cpu list)   [alloc.rs; taken inside any of the above]
//!   depot lock (magazines)
//!     zone lock (buddy)
//! ```
//!
//! Reclaim (`space/reclaim.rs`) isolates a frame from the LRU with a reference, takes its
//! frame lock, walks the reverse map and locks each mapping's slot (try-lock in seed 1's
//! mode for the referenced check, blocking for the unmap); no page-table lock is held
//! across swap I/O: a fault on a swap entry takes a slot reference, lets go of every lock,
//! reads, and retries (`space/swapin.rs`).
//!
//! Walkers (`Manager::frame_referenced`, `Manager::mappers`) take a frame reference and
//! the frame lock, then walk the reverse map (root lock), then lock each mapping's slot.
//! A path that already holds a slot lock may only *try* the frame lock, so no cycle
//! forms; reclaim's seed-1 mode also only tries the slot locks.
//!
//! Frame descriptors ([`frame::Frame`]) are atomics: their counts change under the
//! page-table lock of the entry that maps or unmaps them.
//!
//! A page-table or mmap lock poisoned by a panic is never used as if nothing happened:
//! the VM gets [`SpaceError::Poisoned`] and its frames under that lock are leaked, not
//! reused. Fork protects the parent's host view before sharing; exit revokes the view
//! before freeing (see `space/fork.rs`). Each VM's frames are charged to it
//! ([`charge`]), with an optional limit and reservation.

pub mod alloc;
pub mod charge;
pub mod frame;
pub mod host;
pub mod mmu;
pub mod pagetable;
pub mod pool;
pub mod reclaim;
pub mod space;
pub(crate) mod sync;
pub mod types;
pub mod uring;
pub(crate) mod zone;

pub use alloc::AllocatorKind;
pub use charge::{ChargeError, ChargeSnapshot};
pub use pool::{AllocError, FrameInit, NodeConfig, Pool, PoolConfig};
pub use space::{
    Access, AddressSpace, BalanceConfig, BalanceStats, Balancer, ChildOptions, CowRun, EntryInfo,
    FaultOutcome, MIGRATE_RUN, Manager, ManagerConfig, MemoryUsage, MigrateStats, MigrateWalk,
    NodePolicy, Referenced, ReferencedLocking, RegionSpec, SpaceError, home_node, set_home_node,
};
pub use types::{Gfn, Gpa, NodeId, Order, PAGE_SIZE, Pfn, VmId};
