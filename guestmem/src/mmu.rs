//! The host-MMU observer: how the memory manager tells whoever mirrors its page tables
//! (the VMM's KVM guest windows) that a guest mapping changed.
//!
//! The manager owns the truth (its guest page tables); a [`HostMmu`] keeps a host view
//! in step with it, the way MMU notifiers keep KVM's shadow tables in step with a
//! process's page tables. Calls come in runs: contiguous gfns backed by contiguous frames
//! of one node's memfd, so that the host view stays a few mappings, not one per page.
//!
//! Calls are made with the page-table lock(s) of the run held, so a host view never
//! sees an older state overwrite a newer one. Implementations must not call back into
//! the address space.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use crate::types::{Gfn, NodeId, Pfn};

/// Frames `first .. first + pages` of one node, mapped at guest pages `gfn .. gfn + pages`.
#[derive(Debug, Clone, Copy)]
pub struct MapRun<'a> {
    /// First guest page of the run.
    pub gfn: Gfn,
    /// Pages in the run (at least 1).
    pub pages: u64,
    /// The node whose frames back the run.
    pub node: NodeId,
    /// The first frame of the run.
    pub pfn: Pfn,
    /// The node's memfd.
    pub fd: BorrowedFd<'a>,
    /// Byte offset of `pfn` within `fd`.
    pub file_offset: u64,
    /// Whether guest writes may go straight to the frames (false: copy-on-write pending,
    /// the first write must fault).
    pub writable: bool,
}

/// A host mapping change failed; the guest page stays as it was in the manager's tables
/// and the fault that asked for it returns this error to its VM.
#[derive(Debug, thiserror::Error)]
#[error("host mapping update failed ({op} at {gfn}, {pages} pages): {source}")]
pub struct HostMmuError {
    /// The operation that failed.
    pub op: &'static str,
    /// First guest page of the run.
    pub gfn: Gfn,
    /// Pages in the run.
    pub pages: u64,
    /// The host's error.
    #[source]
    pub source: std::io::Error,
}

/// Mirrors the manager's guest mappings into a host view (see the module docs).
pub trait HostMmu: Send + Sync + fmt::Debug {
    /// Maps a run of frames (replacing whatever was there). All or nothing: on error no
    /// part of the run may be left mapped (the manager frees the frames), and a run asked
    /// for read-only must never be writable, even for a moment.
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError>;
    /// Makes `gfn .. gfn + pages` absent again: any guest access must fault back to the manager.
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError>;
    /// Write-protects (`writable = false`) or unprotects a mapped run.
    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError>;

    /// Called by a fork for each of the parent's regions: from now on no guest write to
    /// `gfn .. gfn + pages` may reach a frame without faulting to the manager. The default
    /// write-protects the run; a view may instead drop the whole run (any later access
    /// faults, and the manager maps present pages again, read-only), which costs a host
    /// far less than write-protecting every populated page.
    fn protect_for_fork(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.protect_run(gfn, pages, false)
    }

    /// Called by an exit for each region before any of its frames is freed: from now on
    /// no access through the view may reach a frame of `gfn .. gfn + pages`, and the
    /// manager will not map the run again. On error the manager keeps (leaks) the
    /// region's frames rather than hand them to another VM. The default unmaps the run.
    fn revoke(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.unmap_run(gfn, pages)
    }

    /// Answers a hinting fault ([`crate::AddressSpace::hint_fault`]): the guest touched
    /// the present run `gfn .. gfn + pages` after a harvest dropped its host entries, and
    /// waits; makes the run reachable again (writable only if `writable`) and lets the
    /// access go on. `Ok(false)`: this view takes no hinting faults (the default), or the
    /// run is not there to restore (the view changed since the fault; the access faults
    /// again).
    fn restore_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<bool, HostMmuError> {
        let _ = (gfn, pages, writable);
        Ok(false)
    }

    /// Reports which pages of `gfn .. gfn + pages` were accessed through the view since
    /// the previous call for them (or since they were mapped), and re-arms them: `out`
    /// becomes a bitmap of `pages.div_ceil(64)` words, bit `i` (word `i / 64`, bit
    /// `i % 64`) set when page `gfn + i` was accessed. Absent pages are never reported.
    /// The manager calls it for whole regions without page-table locks (a remap racing
    /// with it loses nothing; an access between its scan and re-arm is reported now
    /// rather than next time). `Ok(false)`: this view has no access information (the default; `out` is
    /// left empty), so the caller must not treat the pages as idle.
    fn harvest_accessed(
        &self,
        gfn: Gfn,
        pages: u64,
        out: &mut Vec<u64>,
    ) -> Result<bool, HostMmuError> {
        let _ = (gfn, pages);
        out.clear();
        Ok(false)
    }
}

/// A [`HostMmu`] with no host view: for address spaces driven only by software access.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopMmu;

impl HostMmu for NoopMmu {
    fn map_run(&self, _run: MapRun<'_>) -> Result<(), HostMmuError> {
        Ok(())
    }
    fn unmap_run(&self, _gfn: Gfn, _pages: u64) -> Result<(), HostMmuError> {
        Ok(())
    }
    fn protect_run(&self, _gfn: Gfn, _pages: u64, _writable: bool) -> Result<(), HostMmuError> {
        Ok(())
    }
}

/// One call recorded by [`RecordingMmu`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmuCall {
    /// `map_run(gfn, pages, pfn, writable)`.
    Map {
        /// First guest page.
        gfn: Gfn,
        /// Pages.
        pages: u64,
        /// First frame.
        pfn: Pfn,
        /// Writable.
        writable: bool,
    },
    /// `unmap_run(gfn, pages)`.
    Unmap {
        /// First guest page.
        gfn: Gfn,
        /// Pages.
        pages: u64,
    },
    /// `protect_run(gfn, pages, writable)`.
    Protect {
        /// First guest page.
        gfn: Gfn,
        /// Pages.
        pages: u64,
        /// Writable after the call.
        writable: bool,
    },
}

/// A [`HostMmu`] that records every call, for tests that check what the host was told.
#[derive(Debug, Default)]
pub struct RecordingMmu {
    calls: Mutex<Vec<MmuCall>>,
}

impl RecordingMmu {
    /// Takes the calls recorded so far.
    pub fn take(&self) -> Vec<MmuCall> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, call: MmuCall) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

impl HostMmu for RecordingMmu {
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        self.push(MmuCall::Map {
            gfn: run.gfn,
            pages: run.pages,
            pfn: run.pfn,
            writable: run.writable,
        });
        Ok(())
    }
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.push(MmuCall::Unmap { gfn, pages });
        Ok(())
    }
    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError> {
        self.push(MmuCall::Protect {
            gfn,
            pages,
            writable,
        });
        Ok(())
    }
}
