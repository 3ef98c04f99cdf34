//! Reclaim: taking guest memory back (Linux's `mm/vmscan.c`, `mm/swap_state.c`,
//! `mm/swapfile.c`, applied to guests).
//!
//! Every resident guest frame is on its node's LRU lists ([`lru`]). Reclaim takes frames
//! from the inactive tail, asks the reverse map whether any mapping used them since the
//! last look (seed 1's referenced check, in trylock or blocking mode), and for a frame
//! nobody used replaces every entry naming it with a swap entry ([`swap::SwapSlot`]):
//! one slot and one write for a frame that K clones share, its entries found through
//! the reverse map (seed 2's chains make that walk examine the frame's own mappings, not
//! the whole fork tree). The frame sits in the swap cache ([`swapcache`]) until its
//! contents are on disk, so a fault meanwhile costs no I/O; then its host memory goes
//! back to the host (a punched hole) and the frame to the pool. Same-filled pages (all
//! zero among them) are stored as a marker, never written. A fault on a swap entry reads
//! the page back into a new frame without holding a page-table lock across the I/O.
//!
//! Who reclaims: a background thread per manager ([`Reclaimer`], kswapd) that keeps free
//! frames between the low and high watermarks, and any fault whose allocation fails
//! (direct reclaim), which for a VM at its frame limit reclaims that VM's own frames.

pub mod lru;
pub mod swap;
pub mod swapcache;

pub mod kswapd;

pub use kswapd::Reclaimer;

use crate::space::ReferencedLocking;

/// How reclaim runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimConfig {
    /// How the referenced check takes its locks (seed 1: trylock; or blocking).
    pub referenced: ReferencedLocking,
    /// Frames isolated from the LRU per batch (`SWAP_CLUSTER_MAX`).
    pub batch: usize,
    /// Background reclaim starts when free frames fall below this.
    pub low_watermark: u64,
    /// Background reclaim stops when free frames reach this.
    pub high_watermark: u64,
    /// When the host memory of freed frames goes back to the host.
    pub punch: Punch,
}

/// When reclaimed (and other freed) frames' host memory is returned to the host, with a
/// hole punched in the node's memfd.
///
/// Measured (`benches/swap.rs`, docs/BENCHMARKS.md): punching every reclaimed frame at
/// once halves swap-out throughput, and the frames a swap-in or fault then takes must be
/// allocated and zeroed by the host again, about 2 us a page, four fifths of a software
/// swap-in. A pool under pressure reuses what reclaim frees within milliseconds, so the
/// default returns only memory that stays free, as Linux's free page reporting does for
/// a guest's free memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum Punch {
    /// Every frame reclaim frees is punched before it returns to the pool.
    OnReclaim,
    /// The background reclaimer punches free blocks of at least [`Punch::IDLE_ORDER`]
    /// that still have host memory, when a node is at or above its high watermark (no
    /// pressure), at most once per [`Punch::IDLE_PERIOD`].
    #[default]
    WhenIdle,
}

impl Punch {
    /// Smallest free block returned when idle: 64 frames (256 KiB), one span of the
    /// guests' host mappings.
    pub const IDLE_ORDER: u32 = 6;
    /// Shortest time between two idle releases (Linux's page reporting waits 2 s).
    pub const IDLE_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);
}

impl ReclaimConfig {
    /// Defaults for a pool of `frames` frames: low at 1/64 of the pool (at least 256
    /// frames), high at twice that; trylock referenced checks; batches of 32.
    pub fn for_pool(frames: u64) -> ReclaimConfig {
        let low = (frames / 64).max(256).min(frames / 4);
        ReclaimConfig {
            referenced: ReferencedLocking::Trylock,
            batch: 32,
            low_watermark: low,
            high_watermark: (2 * low).min(frames / 2),
            punch: Punch::default(),
        }
    }
}

/// What reclaim did, counted like `/proc/vmstat`'s `pgscan`, `pgsteal`, `pswpout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimStats {
    /// Frames examined on the inactive list.
    pub scanned: u64,
    /// Frames found referenced (or contended) and moved to the active list.
    pub activated: u64,
    /// Active frames aged onto the inactive list.
    pub deactivated: u64,
    /// Frames freed by reclaim.
    pub reclaimed: u64,
    /// Pages written to the swap file.
    pub written: u64,
    /// Pages stored as a same-filled marker (all zero among them): no I/O.
    pub filled: u64,
    /// Frames dropped without I/O because their swap copy was still valid.
    pub clean_dropped: u64,
    /// Entries (mappings) replaced by swap entries.
    pub entries_unmapped: u64,
    /// Frames whose unmapping could not complete (kept resident).
    pub unmap_failed: u64,
    /// Pages whose write failed (kept resident; an EIO slot is marked bad).
    pub write_failed: u64,
    /// Frames skipped because no swap slot was free or swap-out is stopped.
    pub no_slot: u64,
    /// Host memory returned, in frames.
    pub punched: u64,
    /// Swap entries resolved by faults (refaults of evicted pages).
    pub swapins: u64,
    /// Of those, the ones that read the page from the swap file (major faults).
    pub major_faults: u64,
    /// Direct reclaim runs (a fault's allocation failed).
    pub direct_runs: u64,
    /// Background reclaim runs.
    pub background_runs: u64,
    /// Frames found locked in memory ([`AddressSpace::mlock`]) and kept.
    ///
    /// [`AddressSpace::mlock`]: crate::AddressSpace::mlock
    pub unevictable: u64,
}
