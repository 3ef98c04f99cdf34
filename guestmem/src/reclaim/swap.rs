//! The swap device: a file of page-sized slots (Linux's `swap_info_struct` and its
//! `swap_map`), with a slot allocator, per-slot reference counts, same-filled markers and
//! batched writes.
//!
//! Each slot has one `AtomicU32` (its reference count in the low bits, `BAD` and
//! `FILLED` flags above) and one `AtomicU64` (the pattern of a same-filled page): 12
//! bytes per 4 KiB slot, 0.3% of the file. Free slots are a bitmap under one lock, handed
//! out next-fit from a cursor, so the slots of one reclaim batch are mostly consecutive
//! and its write is one `pwritev` per run.
//!
//! Writes are submitted ([`SwapDevice::submit`]) and collected later
//! ([`PendingWrite::wait`]): with [`SwapIo::IoUring`] the kernel writes while the caller
//! goes on, so reclaim unmaps its next batch while the last one is written; with
//! [`SwapIo::Pwritev`] (the default, see there why) the write happens inside the
//! submission.
//!
//! Failure rules: a write failing with `EIO` (or any error but `ENOSPC`) marks its slots
//! bad: they never return to the free bitmap. `ENOSPC` stops the device: every later
//! write fails at once ([`SwapDevice::is_stopped`]) and the error is kept for reports;
//! no slot is marked bad. Either way the caller keeps the pages in memory.

use std::io;
use std::path::{Path, PathBuf};

use crate::host::SwapFile;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering};
use crate::types::PAGE_SIZE;
use crate::uring::{RequestId, Ring};

mod freemap;
use freemap::FreeMap;

/// A slot of the swap file (page `n` of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SwapSlot(pub u64);

const COUNT_BITS: u32 = 30;
const COUNT_MASK: u32 = (1 << COUNT_BITS) - 1;
const BAD: u32 = 1 << 31;
const FILLED: u32 = 1 << 30;
const _: () = assert!(COUNT_MASK & (BAD | FILLED) == 0, "flags above the count");

/// Most pages one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// How the device writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum SwapIo {
    /// Batched synchronous `pwritev` from the reclaiming thread: one call per run of
    /// consecutive slots. The default: a buffered write is a copy into the page cache,
    /// which the reclaiming thread does as fast as a kernel worker (measured in
    /// `benches/swap.rs`: 3.6 GB/s against 3.3-3.6 with io_uring on this project's
    /// 2-core test machine, where waking a worker on the other core costs about 10 us).
    #[default]
    Pwritev,
    /// The same vectored writes submitted to an io_uring ring (`IOSQE_ASYNC`: done by the
    /// kernel's workers) and collected later, so that reclaim unmaps its next batch while
    /// the last one is written. Falls back to [`SwapIo::Pwritev`], with a warning, where
    /// the host has io_uring disabled.
    IoUring,
}

/// Where and how large.
#[derive(Debug, Clone, Default)]
pub struct SwapConfig {
    /// The file to create (must not exist). `None`: a new file in the system temp dir.
    pub path: Option<PathBuf>,
    /// Slots (pages) of the file.
    pub slots: u64,
    /// The I/O method.
    pub io: SwapIo,
}

/// Errors of the swap device.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The file could not be created.
    #[error(
        "cannot create the swap file {path}: {source}; give --swap a path in a writable directory that does not exist yet"
    )]
    Create {
        /// The path.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The file's space could not be preallocated.
    #[error(
        "cannot preallocate {bytes} bytes for the swap file {path}: {source}; free that much space or give --swap a path on another filesystem"
    )]
    Preallocate {
        /// The path.
        path: PathBuf,
        /// Bytes asked for.
        bytes: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// A zero-sized device.
    #[error("a swap file needs at least one slot")]
    Empty,
    /// Writing a slot failed.
    #[error("writing swap slot {slot} failed: {source}")]
    Write {
        /// The slot.
        slot: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// Reading a slot failed.
    #[error("reading swap slot {slot} failed: {source}")]
    Read {
        /// The slot.
        slot: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

/// A fault to inject into writes (tests only): the real syscall path is used otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// The next `next` pages written fail with `EIO`.
    Eio {
        /// Pages.
        next: u64,
    },
    /// Every write fails with `ENOSPC`, as on a full disk.
    NoSpace,
}

/// What the device holds and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SwapStats {
    /// Slots in the file.
    pub slots: u64,
    /// Slots in use (referenced).
    pub used: u64,
    /// Slots marked bad by failed writes.
    pub bad: u64,
    /// Slots holding a same-filled marker (never written).
    pub filled: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Write requests made (`pwritev` calls or io_uring requests): one per run of
    /// consecutive slots.
    pub write_calls: u64,
    /// Read system calls made.
    pub read_calls: u64,
    /// Pages whose write failed.
    pub writes_failed: u64,
}

/// What a batched write did.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Slots whose write failed, with the error.
    pub failed: Vec<(SwapSlot, io::ErrorKind)>,
}

impl WriteOutcome {
    /// The failed slots.
    pub fn failed_slots(&self) -> Vec<SwapSlot> {
        self.failed.iter().map(|(s, _)| *s).collect()
    }
}

/// A batched write under way ([`SwapDevice::submit`]); dropping it waits for it.
#[derive(Debug)]
#[must_use = "the write's failures are in its outcome"]
pub struct PendingWrite<'a> {
    dev: &'a SwapDevice,
    runs: Vec<InFlight>,
    out: WriteOutcome,
}

/// One run's request in the ring, with the iovecs it names.
#[derive(Debug)]
struct InFlight {
    run: Vec<(SwapSlot, *const u8)>,
    iov: Vec<libc::iovec>,
    id: RequestId,
}

impl PendingWrite<'_> {
    /// Waits until every page is written (or failed) and says how it went.
    pub fn wait(mut self) -> WriteOutcome {
        self.collect();
        std::mem::take(&mut self.out)
    }

    fn collect(&mut self) {
        for f in std::mem::take(&mut self.runs) {
            let want = f.iov.len() * PAGE_SIZE;
            // Only a device with a ring has requests in flight.
            let res = match self.dev.ring.as_ref() {
                Some(ring) => ring.lock().unwrap_or_else(|e| e.into_inner()).wait(f.id),
                None => Err(io::Error::from_raw_os_error(libc::EBADF)),
            };
            let res = match res {
                Ok(n) if n == want => Ok(1),
                // A short write: the whole run again, synchronously (the same bytes to the
                // same place).
                Ok(_) => self
                    .dev
                    .pwritev(&f.run, f.run[0].0.0 * PAGE_SIZE as u64)
                    .map(|c| c + 1),
                Err(e) => Err(e),
            };
            self.dev.settle(&f.run, res, &mut self.out);
        }
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        // The kernel may still read the pages: never let them go before it is done.
        self.collect();
    }
}

/// The swap device (see the module docs).
#[derive(Debug)]
pub struct SwapDevice {
    file: SwapFile,
    /// The ring of [`SwapIo::IoUring`] (`None`: synchronous `pwritev`).
    ring: Option<std::sync::Mutex<Ring>>,
    path: PathBuf,
    slots: u64,
    state: Box<[AtomicU32]>,
    fill: Box<[AtomicU64]>,
    free: Mutex<FreeMap>,
    used: AtomicU64,
    bad: AtomicU64,
    filled: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    write_calls: AtomicU64,
    read_calls: AtomicU64,
    writes_failed: AtomicU64,
    /// While set, reads wait (see [`SwapDevice::hold_reads`]); `reads_waiting` counts them.
    hold_reads: AtomicBool,
    reads_waiting: AtomicU64,
    stopped: AtomicBool,
    stop_reason: Mutex<Option<String>>,
    inject: Mutex<Option<InjectedFault>>,
}

/// Numbers default swap file names within the process (a plain std atomic: a static).
static NEXT_NAME: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl SwapDevice {
    /// Creates the swap file (see [`SwapConfig`]).
    pub fn create(cfg: &SwapConfig) -> Result<SwapDevice, SwapError> {
        if cfg.slots == 0 {
            return Err(SwapError::Empty);
        }
        let path = cfg.path.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "kvmm-swap-{}-{}",
                std::process::id(),
                NEXT_NAME.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
        });
        let bytes = cfg.slots * PAGE_SIZE as u64;
        let file = SwapFile::create(&path, bytes).map_err(|(step, source)| {
            if step == "preallocate" {
                // A file that could not be filled is not left behind.
                let _ = std::fs::remove_file(&path);
                SwapError::Preallocate {
                    path: path.clone(),
                    bytes,
                    source,
                }
            } else {
                if step != "create" {
                    let _ = std::fs::remove_file(&path);
                }
                SwapError::Create {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let n = cfg.slots as usize;
        let mut words = vec![u64::MAX; n.div_ceil(64)];
        if n % 64 != 0 {
            words[n / 64] = (1u64 << (n % 64)) - 1;
        }
        let ring = match cfg.io {
            SwapIo::Pwritev => None,
            SwapIo::IoUring => match Ring::new() {
                Ok(r) => Some(std::sync::Mutex::new(r)),
                Err(e) => {
                    tracing::warn!(
                        "io_uring is not available ({e}): the swap file is written with synchronous pwritev"
                    );
                    None
                }
            },
        };
        Ok(SwapDevice {
            file,
            ring,
            path,
            slots: cfg.slots,
            state: (0..n).map(|_| AtomicU32::new(0)).collect(),
            fill: (0..n).map(|_| AtomicU64::new(0)).collect(),
            free: Mutex::new(FreeMap::new(words)),
            used: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            filled: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            write_calls: AtomicU64::new(0),
            read_calls: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            hold_reads: AtomicBool::new(false),
            reads_waiting: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            stop_reason: Mutex::new(None),
            inject: Mutex::new(None),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the device writes (what was asked for, or the fallback).
    pub fn io(&self) -> SwapIo {
        if self.ring.is_some() {
            SwapIo::IoUring
        } else {
            SwapIo::Pwritev
        }
    }

    /// Slots in the file.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Bytes of the file.
    pub fn bytes(&self) -> u64 {
        self.slots * PAGE_SIZE as u64
    }

    /// Bytes the file holds on disk now.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        self.file.allocated_bytes()
    }

    /// Allocates up to `n` slots, each with one reference, preferring consecutive ones;
    /// pushes them to `out` and returns how many (fewer when the device is full).
    pub fn alloc(&self, n: usize, out: &mut Vec<SwapSlot>) -> usize {
        let mut free = crate::sync::lock(&self.free);
        let mut got = 0;
        while got < n {
            let Some(slot) = free.take_next() else {
                break;
            };
            // Relaxed: the free-map lock orders hand-out and return of a slot.
            self.state[slot as usize].store(1, Ordering::Relaxed);
            out.push(SwapSlot(slot));
            got += 1;
        }
        drop(free);
        self.used.fetch_add(got as u64, Ordering::Relaxed);
        got
    }

    /// Adds `n` references to `slot` (entries copied with their block).
    pub fn dup(&self, slot: SwapSlot, n: u32) {
        // Relaxed: as Arc's increment, from a reference already held.
        let before = self.state[slot.0 as usize].fetch_add(n, Ordering::Relaxed);
        debug_assert!(before & COUNT_MASK > 0, "dup of a free slot {slot:?}");
        debug_assert!(
            (before & COUNT_MASK) + n <= COUNT_MASK,
            "slot count overflow"
        );
    }

    /// Drops one reference to `slot`; at zero the slot is free again (a bad one stays out
    /// of use). Returns the references left.
    pub fn put(&self, slot: SwapSlot) -> u32 {
        let st = &self.state[slot.0 as usize];
        // AcqRel: the thread dropping the last reference sees every use made under the
        // others before the slot is handed out again (as Arc::drop).
        let before = st.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before & COUNT_MASK > 0, "slot count underflow {slot:?}");
        let left = (before & COUNT_MASK) - 1;
        if left == 0 {
            if before & FILLED != 0 {
                st.fetch_and(!FILLED, Ordering::Relaxed);
                self.filled.fetch_sub(1, Ordering::Relaxed);
            }
            self.used.fetch_sub(1, Ordering::Relaxed);
            if before & BAD == 0 {
                crate::sync::lock(&self.free).give_back(slot.0);
            }
        }
        left
    }

    /// References to `slot`.
    pub fn count(&self, slot: SwapSlot) -> u32 {
        // Acquire: pairs with `put`'s release, for callers deciding on the count.
        self.state[slot.0 as usize].load(Ordering::Acquire) & COUNT_MASK
    }

    /// Whether a failed write marked `slot` bad.
    pub fn is_bad(&self, slot: SwapSlot) -> bool {
        self.state[slot.0 as usize].load(Ordering::Relaxed) & BAD != 0
    }

    /// Marks `slot` as holding a page that repeats `value` (no I/O).
    pub fn store_filled(&self, slot: SwapSlot, value: u64) {
        // Release (with the flag's AcqRel): a reader that sees FILLED sees the value.
        self.fill[slot.0 as usize].store(value, Ordering::Release);
        let before = self.state[slot.0 as usize].fetch_or(FILLED, Ordering::AcqRel);
        if before & FILLED == 0 {
            self.filled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The pattern of a same-filled slot.
    pub fn filled(&self, slot: SwapSlot) -> Option<u64> {
        (self.state[slot.0 as usize].load(Ordering::Acquire) & FILLED != 0)
            .then(|| self.fill[slot.0 as usize].load(Ordering::Acquire))
    }

    /// Whether swap-out is stopped (the disk was full).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Why swap-out stopped, if it did.
    pub fn stop_reason(&self) -> Option<String> {
        crate::sync::lock(&self.stop_reason).clone()
    }

    /// Test hook: makes the next writes fail as if the kernel had returned that error
    /// (`None` stops injecting; a device stopped by `NoSpace` is started again).
    #[doc(hidden)]
    pub fn inject(&self, fault: Option<InjectedFault>) {
        *crate::sync::lock(&self.inject) = fault;
        if fault.is_none() {
            self.stopped.store(false, Ordering::Relaxed);
        }
    }

    fn injected(&self, pages: usize) -> Option<io::Error> {
        let mut inj = crate::sync::lock(&self.inject);
        match *inj {
            None => None,
            Some(InjectedFault::NoSpace) => Some(io::Error::from_raw_os_error(libc::ENOSPC)),
            Some(InjectedFault::Eio { next }) => {
                let left = next.saturating_sub(pages as u64);
                *inj = (left > 0).then_some(InjectedFault::Eio { next: left });
                Some(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }

    /// Writes each page to its slot: one `pwritev` per run of consecutive slots
    /// ([`SwapDevice::submit`] and [`PendingWrite::wait`] in one).
    ///
    /// # Safety
    ///
    /// Every pointer must be a readable page (`PAGE_SIZE` bytes) that nobody writes
    /// during the call.
    pub unsafe fn write(&self, batch: &[(SwapSlot, *const u8)]) -> WriteOutcome {
        // SAFETY: the caller's contract covers the whole call, which includes the wait.
        unsafe { self.submit(batch) }.wait()
    }

    /// Starts writing each page to its slot, one request per run of consecutive slots;
    /// the returned [`PendingWrite`] says how it went. With [`SwapIo::Pwritev`] the
    /// writes are done before this returns.
    ///
    /// # Safety
    ///
    /// Every pointer must be a readable page (`PAGE_SIZE` bytes) that nobody writes until
    /// the [`PendingWrite`] has been waited for (or dropped, which waits).
    pub unsafe fn submit(&self, batch: &[(SwapSlot, *const u8)]) -> PendingWrite<'_> {
        let mut pending = PendingWrite {
            dev: self,
            runs: Vec::new(),
            out: WriteOutcome::default(),
        };
        let mut pages = batch.to_vec();
        pages.sort_unstable_by_key(|(s, _)| *s);
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && j - i < IOV_MAX && pages[j].0.0 == pages[j - 1].0.0 + 1 {
                j += 1;
            }
            let run = pages[i..j].to_vec();
            i = j;
            let early = if self.is_stopped() {
                Some(io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                self.injected(run.len())
            };
            if let Some(e) = early {
                self.settle(&run, Err(e), &mut pending.out);
                continue;
            }
            let offset = run[0].0.0 * PAGE_SIZE as u64;
            if let Some(ring) = &self.ring {
                let iov: Vec<libc::iovec> = run
                    .iter()
                    .map(|(_, p)| libc::iovec {
                        iov_base: p.cast_mut().cast(),
                        iov_len: PAGE_SIZE,
                    })
                    .collect();
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: the iovecs live in `pending.runs` (a Vec's heap buffer does not
                // move) and their pages stay unwritten until the request is collected,
                // which `PendingWrite` does before it goes (the caller's contract); the
                // file is `self`'s, which `pending` borrows.
                match unsafe { ring.writev(self.file.raw_fd(), &iov, offset) } {
                    Ok(id) => pending.runs.push(InFlight { run, iov, id }),
                    Err(e) => {
                        drop(ring);
                        tracing::warn!("io_uring submission failed ({e}); writing with pwritev");
                        let res = self.pwritev(&run, offset);
                        self.settle(&run, res, &mut pending.out);
                    }
                }
            } else {
                let res = self.pwritev(&run, offset);
                self.settle(&run, res, &mut pending.out);
            }
        }
        pending
    }

    /// A synchronous write of `run` at `offset`; returns the calls made.
    fn pwritev(&self, run: &[(SwapSlot, *const u8)], offset: u64) -> io::Result<u64> {
        let ptrs: Vec<*const u8> = run.iter().map(|(_, p)| *p).collect();
        // SAFETY: by `submit`'s contract each pointer is a readable page that nobody
        // writes until the write is collected.
        unsafe { self.file.write_pages(offset, &ptrs, PAGE_SIZE) }
    }

    /// Counts what the write of `run` did; a failure marks its slots bad (`EIO`) or
    /// stops the device (`ENOSPC`) and is added to `out`.
    fn settle(&self, run: &[(SwapSlot, *const u8)], res: io::Result<u64>, out: &mut WriteOutcome) {
        match res {
            Ok(calls) => {
                self.write_calls.fetch_add(calls, Ordering::Relaxed);
                self.bytes_written
                    .fetch_add((run.len() * PAGE_SIZE) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.write_calls.fetch_add(1, Ordering::Relaxed);
                self.writes_failed
                    .fetch_add(run.len() as u64, Ordering::Relaxed);
                let nospc = e.raw_os_error() == Some(libc::ENOSPC);
                if nospc {
                    if !self.stopped.swap(true, Ordering::Relaxed) {
                        let msg = format!(
                            "swap-out stopped: the swap file {} is on a full disk ({e}); pages stay in memory",
                            self.path.display()
                        );
                        tracing::error!("{msg}");
                        *crate::sync::lock(&self.stop_reason) = Some(msg);
                    }
                } else {
                    tracing::warn!(
                        "swap write of {} page(s) failed ({e}); the slots are marked bad and the pages stay in memory",
                        run.len()
                    );
                    for (s, _) in run {
                        let before = self.state[s.0 as usize].fetch_or(BAD, Ordering::Relaxed);
                        if before & BAD == 0 {
                            self.bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                out.failed.extend(run.iter().map(|(s, _)| (*s, e.kind())));
            }
        }
    }

    /// Reads `slot` into `dst` (see [`SwapDevice::read_many`]).
    ///
    /// # Safety
    ///
    /// As for [`SwapDevice::read_many`].
    pub unsafe fn read(&self, slot: SwapSlot, dst: *mut u8) -> Result<(), SwapError> {
        // SAFETY: the caller's contract.
        unsafe { self.read_many(&[(slot, dst)]) }
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Reads each slot of `batch` into its page: a same-filled slot from its marker, and
    /// every run of consecutive slots with one `preadv` (a readahead run is one call).
    /// Returns one result per entry, in `batch` order.
    ///
    /// # Safety
    ///
    /// Each pointer must be a writable, 8-byte aligned page that nothing else reads or
    /// writes during the call.
    pub unsafe fn read_many(&self, batch: &[(SwapSlot, *mut u8)]) -> Vec<Result<(), SwapError>> {
        self.wait_while_held();
        let mut out: Vec<Result<(), SwapError>> = batch.iter().map(|_| Ok(())).collect();
        let mut from_file: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, &(slot, dst)) in batch.iter().enumerate() {
            match self.filled(slot) {
                Some(v) => {
                    for w in 0..PAGE_SIZE / 8 {
                        // SAFETY: `dst` is a writable, 8-aligned page (the caller's contract).
                        unsafe { dst.cast::<u64>().add(w).write(v) };
                    }
                }
                None => from_file.push(i),
            }
        }
        from_file.sort_unstable_by_key(|&i| batch[i].0);
        let mut a = 0;
        while a < from_file.len() {
            let mut b = a + 1;
            while b < from_file.len()
                && b - a < IOV_MAX
                && batch[from_file[b]].0.0 == batch[from_file[b - 1]].0.0 + 1
            {
                b += 1;
            }
            let run = &from_file[a..b];
            a = b;
            let ptrs: Vec<*mut u8> = run.iter().map(|&i| batch[i].1).collect();
            let first = batch[run[0]].0;
            // SAFETY: as the caller promises for each page.
            let res = unsafe {
                self.file
                    .read_pages(first.0 * PAGE_SIZE as u64, &ptrs, PAGE_SIZE)
            };
            match res {
                Ok(calls) => {
                    self.read_calls.fetch_add(calls, Ordering::Relaxed);
                    self.bytes_read
                        .fetch_add((run.len() * PAGE_SIZE) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.read_calls.fetch_add(1, Ordering::Relaxed);
                    for &i in run {
                        out[i] = Err(SwapError::Read {
                            slot: batch[i].0.0,
                            source: io::Error::new(e.kind(), e.to_string()),
                        });
                    }
                }
            }
        }
        out
    }

    /// Makes every read wait until called again with `false` (for tests: a swap-in that
    /// stays in flight, to show what it does and does not hold up).
    pub fn hold_reads(&self, hold: bool) {
        self.hold_reads.store(hold, Ordering::SeqCst);
    }

    /// Reads waiting in [`SwapDevice::hold_reads`] now.
    pub fn reads_waiting(&self) -> u64 {
        self.reads_waiting.load(Ordering::SeqCst)
    }

    fn wait_while_held(&self) {
        if !self.hold_reads.load(Ordering::SeqCst) {
            return;
        }
        self.reads_waiting.fetch_add(1, Ordering::SeqCst);
        while self.hold_reads.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.reads_waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// What the device holds and did.
    pub fn stats(&self) -> SwapStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SwapStats {
            slots: self.slots,
            used: r(&self.used),
            bad: r(&self.bad),
            filled: r(&self.filled),
            bytes_written: r(&self.bytes_written),
            bytes_read: r(&self.bytes_read),
            write_calls: r(&self.write_calls),
            read_calls: r(&self.read_calls),
            writes_failed: r(&self.writes_failed),
        }
    }
}

impl Drop for SwapDevice {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(
                "could not remove the swap file {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
