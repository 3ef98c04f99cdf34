//! Which guest pages a window's guest accessed: a host page-table scan and a zap
//! (see [`Window::harvest_accessed`]).

use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::types::{Gfn, Gpa};

use super::{PAGE, Window, WindowError};
use crate::sys::pagemap::{self, PageRegion, Pagemap, PagemapError, ScanQuery};

/// Harvesting guest accesses (see [`Window::harvest_accessed`]).
impl Window {
    /// Reports which guest pages of `gfn .. gfn + pages` were accessed (read or written,
    /// by a vCPU or by the VMM through the window) since the previous harvest of them, and
    /// re-arms them. `out` becomes a bitmap of `pages.div_ceil(64)` words: bit `i % 64` of
    /// word `i / 64` is page `gfn + i`.
    ///
    /// How: a page of a memfd run that has a present host page-table entry was accessed
    /// since its entry was last dropped (KVM reaches guest RAM only through the host page
    /// tables: a guest access to a page without an entry is a host fault that makes one).
    /// So one `PAGEMAP_SCAN` (Linux 6.7+; else `/proc/self/pagemap`, 8 bytes a page) finds
    /// the runs of present memfd pages, which are reported and then zapped
    /// (`MADV_DONTNEED`): the frames stay in their memfd, the next access is a host minor
    /// fault that maps the same frame again (plus a KVM fault to rebuild its entry). Only
    /// reported pages are zapped, so its cost grows with the pages accessed, not the range.
    ///
    /// - Holes (absent pages: anonymous, uffd-registered) are never reported or zapped;
    ///   their MISSING registration is untouched.
    /// - A write-protected page stays write-protected: a zap of a uffd-wp page of a shmem
    ///   mapping leaves a uffd-wp PTE marker, and the refault maps the page write-protected
    ///   again (checked by `vmm/tests/harvest.rs`), so a copy-on-write fault still comes.
    /// - A page mapped by `map_run` (populated at once) counts as accessed until its first
    ///   harvest, as a fresh page is young in Linux.
    /// - Call it with the page-table lock(s) of the range held, like the manager's other
    ///   calls, so that no `map_run`/`unmap_run` of the range runs in between. Even
    ///   without: a run remapped between the scan and the zap only loses its page-table
    ///   entries (memfd pages lose nothing; write-protection stays as above; a new hole
    ///   holds no pages). An access between the scan and the zap of an already reported
    ///   page is counted in this harvest, not the next.
    ///
    /// Costs on the dev host are in `benches/access_harvest.rs`.
    pub fn harvest_accessed(
        &self,
        gfn: Gfn,
        pages: u64,
        out: &mut Vec<u64>,
    ) -> Result<(), WindowError> {
        // The pin keeps a fork from swapping the range while it is scanned and zapped.
        let g = self.pin();
        let len = pages.saturating_mul(PAGE);
        let gpa = gfn.checked_gpa().unwrap_or(Gpa(u64::MAX));
        let addr = self.check(&g, "harvest_accessed", gpa, len)?;
        out.clear();
        out.resize(pages.div_ceil(64) as usize, 0);
        if pages == 0 {
            return Ok(());
        }
        let pm = pagemap_file()?;
        if SCAN_WORKS.load(Ordering::Relaxed) {
            match harvest_scan(pm, addr, len, out) {
                Err(WindowError::Pagemap(PagemapError::NoScan)) => {
                    tracing::info!(
                        "no PAGEMAP_SCAN on this kernel: harvesting through pagemap reads"
                    );
                    SCAN_WORKS.store(false, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        harvest_read(pm, addr, len, out)
    }
}

/// Whether `PAGEMAP_SCAN` may be tried (cleared the first time the kernel lacks it).
static SCAN_WORKS: AtomicBool = AtomicBool::new(true);
/// `/proc/self/pagemap`, opened on first use.
static PAGEMAP: std::sync::OnceLock<Pagemap> = std::sync::OnceLock::new();

fn pagemap_file() -> Result<&'static Pagemap, WindowError> {
    if let Some(pm) = PAGEMAP.get() {
        return Ok(pm);
    }
    let pm = Pagemap::open()?;
    Ok(PAGEMAP.get_or_init(|| pm))
}

/// Regions one `PAGEMAP_SCAN` call may return before the walk is resumed.
const SCAN_REGIONS: usize = 512;
/// Pages of pagemap entries read at a time by the fallback.
const READ_CHUNK: u64 = 8192;

/// Marks pages `first .. first + n` (window-relative) in `out`.
fn set_bits(out: &mut [u64], first: u64, n: u64) {
    for p in first..first + n {
        out[(p / 64) as usize] |= 1 << (p % 64);
    }
}

/// Drops the entries of a run of present memfd pages of the window.
fn zap_run(addr: u64, len: u64) -> Result<(), WindowError> {
    // SAFETY: the run is inside the window (the caller's range was checked under its pin)
    // and consists of pages the host reported present and file-backed, i.e. MAP_SHARED
    // memfd runs (the window maps no other file): their frames stay in the memfd and the
    // next access maps them again; uffd-wp state survives as PTE markers. No Rust
    // reference points into guest RAM.
    unsafe { pagemap::zap(addr, len) }?;
    Ok(())
}

/// [`Window::harvest_accessed`] through `PAGEMAP_SCAN`.
fn harvest_scan(pm: &Pagemap, addr: u64, len: u64, out: &mut [u64]) -> Result<(), WindowError> {
    let q = ScanQuery {
        mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_FILE,
        inverted: 0,
        ret: pagemap::PAGE_IS_PRESENT,
    };
    let end = addr + len;
    let mut regions: Vec<PageRegion> = Vec::with_capacity(SCAN_REGIONS);
    let mut at = addr;
    while at < end {
        let walked = pm.scan(at, end, q, &mut regions)?;
        for r in &regions {
            let (s, e) = (r.start.max(at), r.end.min(end));
            if s >= e {
                continue;
            }
            set_bits(out, (s - addr) / PAGE, (e - s) / PAGE);
            zap_run(s, e - s)?;
        }
        // The kernel resumes after the last region it returned when the vector filled.
        let next = regions.last().map_or(walked, |r| walked.max(r.end));
        if next <= at {
            break;
        }
        at = next;
    }
    Ok(())
}

/// [`Window::harvest_accessed`] through `/proc/self/pagemap` reads (kernels before 6.7).
fn harvest_read(pm: &Pagemap, addr: u64, len: u64, out: &mut [u64]) -> Result<(), WindowError> {
    let pages = len / PAGE;
    let mut entries = vec![0u64; READ_CHUNK.min(pages) as usize];
    let wanted = pagemap::PM_PRESENT | pagemap::PM_FILE;
    let mut first = 0;
    while first < pages {
        let n = READ_CHUNK.min(pages - first);
        let chunk = &mut entries[..n as usize];
        pm.read(addr + first * PAGE, chunk)?;
        let mut i = 0;
        while i < n {
            if chunk[i as usize] & wanted != wanted {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && chunk[i as usize] & wanted == wanted {
                i += 1;
            }
            set_bits(out, first + start, i - start);
            zap_run(addr + (first + start) * PAGE, (i - start) * PAGE)?;
        }
        first += n;
    }
    Ok(())
}

/// Which harvesting method [`Window::harvest_accessed`] uses in this process.
pub fn harvest_uses_scan() -> bool {
    SCAN_WORKS.load(Ordering::Relaxed)
}
