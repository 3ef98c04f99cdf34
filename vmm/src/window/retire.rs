//! Retiring a window range a fork replaced: its pages dropped and the range unmapped on
//! a background thread, off the fork's path.

use std::sync::{Arc, Mutex};

use crate::sys::mman;

/// Chunk in which a retired range's pages are dropped: `MADV_DONTNEED` holds the process's
/// mmap lock only for reading, and only per chunk, so faults and mappings elsewhere go on.
const RETIRE_CHUNK: u64 = 32 << 20;

/// Drops a retired window range off the caller's path: on a background thread, its pages
/// are dropped chunk by chunk, then the (now empty) range is unmapped. Zapping a populated
/// range costs about 24 ms per GiB here; one `munmap` would hold the mmap lock for all of
/// it and stall every other mapping change in the process (a fork's VM creation included).
pub fn retire(addr: u64, len: u64) {
    retire_after(addr, len, ());
}

/// A retired window range and what must go before it (the KVM VM that used it, so that
/// its MMU need not follow the unmapping), destroyed on a background thread when this is
/// dropped: hold it until the fork is done, so the teardown does not compete with it.
pub struct Retiree {
    addr: u64,
    len: u64,
    first: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for Retiree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Retiree({:#x}, {:#x})", self.addr, self.len)
    }
}

impl Retiree {
    /// `addr .. addr + len`, after dropping `first`.
    pub fn new(addr: u64, len: u64, first: Box<dyn Send>) -> Retiree {
        Retiree {
            addr,
            len,
            first: Some(first),
        }
    }
}

impl Drop for Retiree {
    fn drop(&mut self) {
        let first = self.first.take();
        retire_after(self.addr, self.len, first);
    }
}

/// As [`retire`], after dropping `first` (e.g. the KVM VM that used the range, so that
/// its MMU does not have to follow the unmapping) on the same background thread.
pub fn retire_after<T: Send + 'static>(addr: u64, len: u64, first: T) {
    let work = move || {
        drop(first);
        let mut at = 0;
        while at < len {
            let n = RETIRE_CHUNK.min(len - at);
            // SAFETY: the range was a window's and nothing refers to it any more (the
            // memslot moved away or its VM is gone; the window's base points elsewhere).
            unsafe {
                libc::madvise(
                    (addr + at) as *mut libc::c_void,
                    n as usize,
                    libc::MADV_DONTNEED,
                )
            };
            at += n;
        }
        // SAFETY: as above.
        unsafe { mman::unmap(addr as *mut u8, len) }
    };
    // If no thread can be started, the caller pays for the teardown: a retired range
    // never stays mapped for want of a thread.
    let slot = Arc::new(Mutex::new(Some(work)));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("window-retire".into())
        .spawn(move || {
            let w = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(w) = w {
                w();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread to retire a window range ({e}); retiring it inline");
        let w = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w();
        }
    }
}
