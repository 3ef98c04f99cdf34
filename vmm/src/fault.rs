//! Guest memory faults: the [`FaultResolver`] interface the VMM's fault handler calls,
//! the per-VM handler loop that reads userfaultfd events and wakes the faulting vCPU, fault
//! counters by kind, and [`ScaffoldResolver`], a minimal resolver over one memfd of its own.
//!
//! `ScaffoldResolver` is scaffolding for tests until guestmem's `AddressSpace::handle_fault`
//! takes its place: it zero-fills on MISSING, copies on write after [`ScaffoldResolver::write_protect`]
//! (copy-on-write), never frees, and maps one page per fault through the [`Window`]'s
//! [`HostMmu`] methods, exactly as the memory manager will.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::mmu::{HostMmu, MapRun};
use guestmem::types::{Gfn, NodeId, PAGE_SIZE, Pfn};

use crate::sys::mman::{self, MmanError};
use crate::sys::uffd::{Uffd, UffdError, UffdEvent};
use crate::window::Window;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a fault could not be resolved; the faulting VM stops with this error.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The resolver ran out of frames.
    #[error("out of guest frames resolving a fault at {0}: give the VM a bigger pool")]
    OutOfFrames(Gfn),
    /// The fault is outside guest RAM.
    #[error("fault at host address {0:#x} is outside guest RAM")]
    OutsideRam(u64),
    /// Updating the host mapping failed.
    #[error(transparent)]
    HostMmu(#[from] guestmem::mmu::HostMmuError),
    /// A host memory call failed.
    #[error(transparent)]
    Mman(#[from] MmanError),
    /// The guest RAM window failed.
    #[error(transparent)]
    Window(#[from] crate::window::WindowError),
    /// A userfaultfd call (reading faults, waking a vCPU) failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The memory manager refused the fault (out of frames, the VM's limit, ...).
    #[error(transparent)]
    Space(#[from] guestmem::SpaceError),
    /// A fault reached a VM shell before it was given memory.
    #[error("a {kind:?} fault at {gfn} in a VM shell with no memory: attach a resolver first")]
    NoResolver {
        /// The page.
        gfn: Gfn,
        /// The access.
        kind: FaultKind,
    },
    /// The same fault came back again and again after being resolved.
    #[error(
        "{event:?} came back {count} times after being resolved: the page the resolver maps \
         there is not populated in its memfd (populate frames before mapping them, e.g. \
         Pool::prefault or writing the zero fill)"
    )]
    Repeating {
        /// The event.
        event: UffdEvent,
        /// How many times in a row.
        count: u32,
    },
    /// The fault handler panicked; the VM's memory state is unknown and it is stopped.
    #[error("the fault handler panicked ({0}); the VM is stopped, its siblings run on")]
    Panicked(String),
    /// The VMM process that manages a worker's VM refused the fault, or could not be
    /// reached ([`crate::worker`]); the message is the VMM's error.
    #[error("the memory manager's process: {what}")]
    Remote {
        /// What went wrong, as the VMM's process said it.
        what: String,
        /// Whether it failed on a host limit the user can raise.
        host_limit: bool,
    },
}

impl FaultError {
    /// Whether the fault failed on a host limit the user can raise (see
    /// [`crate::window::host_mmu_limit`]) rather than on the guest or its memory.
    pub fn is_host_limit(&self) -> bool {
        match self {
            FaultError::Mman(e) => e.is_host_limit(),
            FaultError::Window(e) => e.is_host_limit(),
            FaultError::HostMmu(e) => crate::window::host_mmu_limit(e),
            FaultError::Space(guestmem::SpaceError::Host { source, .. }) => {
                crate::window::host_mmu_limit(source)
            }
            FaultError::Remote { host_limit, .. } => *host_limit,
            _ => false,
        }
    }
}

/// The kind of a guest memory fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FaultKind {
    /// First access to an absent page.
    Missing {
        /// The access was a write.
        write: bool,
    },
    /// A write to a write-protected (copy-on-write) page.
    WriteProtect,
    /// An access to a present page whose host entry a harvest dropped, in a window that
    /// takes hinting faults ([`crate::window::Window::take_hinting_faults`]): the
    /// resolver records who touched it and restores the entry.
    Hint {
        /// The access was a write.
        write: bool,
    },
}

impl FaultKind {
    /// Whether the faulting access writes.
    pub fn is_write(self) -> bool {
        !matches!(
            self,
            FaultKind::Missing { write: false } | FaultKind::Hint { write: false }
        )
    }
}

/// Resolves a guest fault: after `Ok`, the page at `gfn` is mapped in the VM's window
/// (writable if the access was a write). Called from the VM's fault handler thread; it
/// must not touch guest RAM through the window itself (that would fault into itself).
/// Resolving a page that is already mapped (two vCPUs raced for it) must succeed.
pub trait FaultResolver: Send + Sync + std::fmt::Debug {
    /// Resolves one fault.
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError>;

    /// Resolves one fault and says which pages around `gfn` it made present (at least
    /// `gfn`): the handler wakes every access waiting in them. The default resolves and
    /// names `gfn` alone. Naming a page that is not resolved is harmless (its access
    /// faults again), only slower.
    fn resolve_run(&self, gfn: Gfn, kind: FaultKind) -> Result<Range<Gfn>, FaultError> {
        self.resolve(gfn, kind)?;
        Ok(gfn..gfn.offset(1))
    }
}

/// Faults handled, by kind (all counters only ever grow; Relaxed: statistics).
#[derive(Debug, Default)]
pub struct FaultStats {
    /// MISSING faults from reads.
    pub missing_read: AtomicU64,
    /// MISSING faults from writes.
    pub missing_write: AtomicU64,
    /// Write-protect faults.
    pub write_protect: AtomicU64,
    /// Hinting (userfaultfd MINOR) faults.
    pub hint: AtomicU64,
    /// Nanoseconds spent in the resolver plus wake.
    pub handler_ns: AtomicU64,
    /// Nanoseconds spent in the resolver alone.
    pub resolve_ns: AtomicU64,
}

/// A snapshot of [`FaultStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FaultCounts {
    /// MISSING faults from reads.
    pub missing_read: u64,
    /// MISSING faults from writes.
    pub missing_write: u64,
    /// Write-protect faults.
    pub write_protect: u64,
    /// Hinting (userfaultfd MINOR) faults.
    pub hint: u64,
    /// Nanoseconds spent resolving and waking.
    pub handler_ns: u64,
    /// Nanoseconds spent in the resolver alone.
    pub resolve_ns: u64,
}

impl FaultCounts {
    /// All faults.
    pub fn total(&self) -> u64 {
        self.missing_read + self.missing_write + self.write_protect + self.hint
    }
}

impl FaultStats {
    /// The counters now.
    pub fn snapshot(&self) -> FaultCounts {
        FaultCounts {
            missing_read: self.missing_read.load(Ordering::Relaxed),
            missing_write: self.missing_write.load(Ordering::Relaxed),
            write_protect: self.write_protect.load(Ordering::Relaxed),
            hint: self.hint.load(Ordering::Relaxed),
            handler_ns: self.handler_ns.load(Ordering::Relaxed),
            resolve_ns: self.resolve_ns.load(Ordering::Relaxed),
        }
    }
}

/// Handles one userfaultfd event: resolve through `resolver`, count, wake the waiters.
pub fn handle_event(
    window: &Window,
    uffd: &Uffd,
    resolver: &dyn FaultResolver,
    stats: &FaultStats,
    ev: UffdEvent,
) -> Result<(), FaultError> {
    let (addr, kind) = match ev {
        UffdEvent::Missing { addr, write, .. } => (addr, FaultKind::Missing { write }),
        UffdEvent::WriteProtect { addr, .. } => (addr, FaultKind::WriteProtect),
        UffdEvent::Minor { addr, write, .. } => (addr, FaultKind::Hint { write }),
        UffdEvent::Other(_) => return Ok(()),
    };
    let t0 = std::time::Instant::now();
    let gfn = window.gfn_of(addr).ok_or(FaultError::OutsideRam(addr))?;
    tracing::trace!(%gfn, ?kind, "guest fault");
    let run = resolver.resolve_run(gfn, kind)?;
    stats
        .resolve_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let counter = match kind {
        FaultKind::Missing { write: false } => &stats.missing_read,
        FaultKind::Missing { write: true } => &stats.missing_write,
        FaultKind::WriteProtect => &stats.write_protect,
        FaultKind::Hint { .. } => &stats.hint,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    // Counted before the wake: once woken, the vCPU may finish its command and the
    // counts be read. Every access waiting in the run goes on (one not yet read from
    // the queue leaves it: its fault is never handled).
    // Host addresses from the faulting one: the same window range it was in.
    let page = addr & !(PAGE - 1);
    if run.start <= gfn && gfn < run.end && run.end.0 <= window.pages() {
        let lo = page - (gfn.0 - run.start.0) * PAGE;
        uffd.wake(lo, (run.end.0 - run.start.0) * PAGE)?;
    } else {
        uffd.wake(page, PAGE)?;
    }
    stats
        .handler_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    Ok(())
}

/// A resolver for windows backed by the host kernel
/// ([`Window::map_host_backed`](crate::window::Window::map_host_backed)): no fault reaches
/// it, and every page is already "there", so resolving is a no-op. Benchmark baseline only.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostBacked;

impl FaultResolver for HostBacked {
    fn resolve(&self, _gfn: Gfn, _kind: FaultKind) -> Result<(), FaultError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    frame: u64,
    writable: bool,
}

/// Scaffolding resolver (see the module docs): frames from one memfd, handed out in order.
#[derive(Debug)]
pub struct ScaffoldResolver {
    window: Arc<Window>,
    fd: OwnedFd,
    direct: usize,
    frames: u64,
    /// Guest page -> frame and writability. Lock held across the host mapping update so
    /// that concurrent faults on one page see one outcome.
    pages: Mutex<HashMap<u64, Mapped>>,
    next: AtomicU64,
}

impl ScaffoldResolver {
    /// A resolver for `window` with a pool of `frames` frames.
    pub fn new(window: Arc<Window>, frames: u64) -> Result<ScaffoldResolver, FaultError> {
        let fd = mman::memfd("scaffold-pool", frames * PAGE)?;
        let direct = mman::map_shared(frames * PAGE, fd.as_fd())? as usize;
        Ok(ScaffoldResolver {
            window,
            fd,
            direct,
            frames,
            pages: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// Frames handed out so far.
    pub fn frames_used(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    fn alloc(&self, gfn: Gfn) -> Result<u64, FaultError> {
        let f = self.next.fetch_add(1, Ordering::Relaxed);
        if f >= self.frames {
            return Err(FaultError::OutOfFrames(gfn));
        }
        Ok(f)
    }

    fn frame_ptr(&self, frame: u64) -> *mut u8 {
        (self.direct + (frame * PAGE) as usize) as *mut u8
    }

    fn map(&self, gfn: Gfn, frame: u64, writable: bool) -> Result<(), FaultError> {
        self.window.map_run(MapRun {
            gfn,
            pages: 1,
            node: NodeId(0),
            pfn: Pfn(frame as u32),
            fd: self.fd.as_fd(),
            file_offset: frame * PAGE,
            writable,
        })?;
        Ok(())
    }

    /// Write-protects every mapped page in `start .. start + pages` so the next guest write
    /// to each raises a WP fault and copies it (the copy-on-write half of a fork).
    pub fn write_protect(&self, start: Gfn, pages: u64) -> Result<(), FaultError> {
        let mut map = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        for g in start.0..start.0 + pages {
            if let Some(m) = map.get_mut(&g) {
                m.writable = false;
            }
        }
        self.window.protect_run(start, pages, false)?;
        Ok(())
    }

    /// Makes `start .. start + pages` absent again (later accesses fault as MISSING).
    pub fn unmap(&self, start: Gfn, pages: u64) -> Result<(), FaultError> {
        let mut map = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        for g in start.0..start.0 + pages {
            map.remove(&g);
        }
        self.window.unmap_run(start, pages)?;
        Ok(())
    }
}

impl FaultResolver for ScaffoldResolver {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        if let FaultKind::Hint { .. } = kind {
            // Its windows never take hinting faults.
            return Ok(());
        }
        let mut map = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        match (map.get(&gfn.0).copied(), kind) {
            (Some(m), _) if m.writable || !kind.is_write() => Ok(()), // raced: already there
            (Some(m), _) => {
                // Copy-on-write: copy the shared frame into a new one, map that writable.
                let f = self.alloc(gfn)?;
                // SAFETY: both frames are inside the direct map of the pool (frame <
                // frames), which lives as long as self; they are distinct frames.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.frame_ptr(m.frame),
                        self.frame_ptr(f),
                        PAGE as usize,
                    )
                };
                self.map(gfn, f, true)?;
                map.insert(
                    gfn.0,
                    Mapped {
                        frame: f,
                        writable: true,
                    },
                );
                Ok(())
            }
            (None, _) => {
                let f = self.alloc(gfn)?;
                // Populate the shmem page (an unpopulated one would raise MISSING again).
                // SAFETY: inside the direct map (frame < frames); frames are handed out once.
                unsafe { self.frame_ptr(f).write_volatile(0) };
                self.map(gfn, f, true)?;
                map.insert(
                    gfn.0,
                    Mapped {
                        frame: f,
                        writable: true,
                    },
                );
                Ok(())
            }
        }
    }
}

impl Drop for ScaffoldResolver {
    fn drop(&mut self) {
        // SAFETY: the direct map is ours and nothing uses it after drop.
        unsafe { mman::unmap(self.direct as *mut u8, self.frames * PAGE) };
    }
}
