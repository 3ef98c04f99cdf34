//! The thin typed layer over the host-memory system calls the manager needs: memfds
//! (frame arenas), shared mappings of them (direct maps), hole punching, NUMA binding and
//! CPU identity. Nothing else in this crate calls `libc` directly.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Errors from host memory calls.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `memfd_create` or `ftruncate` failed.
    #[error(
        "could not create a {bytes}-byte memfd for frames: {source}; check free memory and RLIMIT_NOFILE"
    )]
    Memfd {
        /// Requested size.
        bytes: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error(
        "could not map {bytes} bytes of a memfd: {source}; check vm.max_map_count and free address space"
    )]
    Map {
        /// Requested size.
        bytes: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// `fallocate(PUNCH_HOLE)` failed.
    #[error("could not return {bytes} bytes at offset {offset} to the host: {source}")]
    Punch {
        /// Offset in the memfd.
        offset: u64,
        /// Length.
        bytes: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// `fallocate` failed: the host is out of memory (or shmem space) for the frames.
    #[error(
        "could not back {bytes} bytes at offset {offset} of a frame memfd with host memory: {source}; the host is short of memory"
    )]
    Allocate {
        /// Offset in the memfd.
        offset: u64,
        /// Length.
        bytes: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The named host NUMA node does not exist.
    #[error(
        "host NUMA node {0} does not exist (see /sys/devices/system/node); name an existing node or none"
    )]
    NoSuchHostNode(u32),
    /// `mbind` failed.
    #[error("could not bind frames to host NUMA node {node}: {source}")]
    Mbind {
        /// The host node.
        node: u32,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// `fstat` failed.
    #[error("could not stat a memfd: {0}")]
    Stat(#[source] io::Error),
}

/// A swap file: a regular file of page-sized slots, written and read at offsets.
#[derive(Debug)]
pub struct SwapFile {
    file: std::fs::File,
}

impl SwapFile {
    /// Creates `path` (it must not exist: `O_EXCL`), readable and writable by its owner
    /// only (mode 0600 whatever the umask), and preallocates `len` bytes so that writes
    /// later do not run out of space.
    pub fn create(path: &std::path::Path, len: u64) -> Result<SwapFile, (&'static str, io::Error)> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| ("create", e))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ("chmod", e))?;
        let l = libc::off_t::try_from(len)
            .map_err(|_| ("preallocate", io::Error::from_raw_os_error(libc::EFBIG)))?;
        // SAFETY: fallocate on a file descriptor we own, with valid offset and length.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, l) } != 0 {
            return Err(("preallocate", io::Error::last_os_error()));
        }
        Ok(SwapFile { file })
    }

    /// The file's descriptor, for requests submitted elsewhere (the io_uring layer); it
    /// stays open as long as `self`.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Bytes the file holds on disk (its allocated blocks).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Writes `pages` (each `len` bytes at the given address) to consecutive offsets from
    /// `offset`, with one `pwritev` call (more only for a short write). Returns the
    /// system calls made.
    ///
    /// # Safety
    ///
    /// Every pointer must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn write_pages(
        &self,
        offset: u64,
        pages: &[*const u8],
        len: usize,
    ) -> io::Result<u64> {
        let ptrs: Vec<*mut u8> = pages.iter().map(|p| p.cast_mut()).collect();
        // SAFETY: every iovec points to `len` readable bytes (the caller's contract);
        // pwritev only reads them.
        unsafe {
            self.vectored(
                offset,
                &ptrs,
                len,
                io::ErrorKind::WriteZero,
                |fd, v, n, at| libc::pwritev(fd, v, n, at),
            )
        }
    }

    /// Reads consecutive `len`-byte pages from `offset` into `pages`, with one `preadv`
    /// call (more only for a short read). Returns the system calls made.
    ///
    /// # Safety
    ///
    /// Every pointer must be valid for writes of `len` bytes and not read or written by
    /// anyone else during the call.
    pub unsafe fn read_pages(&self, offset: u64, pages: &[*mut u8], len: usize) -> io::Result<u64> {
        // SAFETY: every iovec points to `len` writable bytes no one else touches (the
        // caller's contract).
        unsafe {
            self.vectored(
                offset,
                pages,
                len,
                io::ErrorKind::UnexpectedEof,
                |fd, v, n, at| libc::preadv(fd, v, n, at),
            )
        }
    }

    /// One `preadv`/`pwritev` (`call`) over `pages` from `offset`, repeated for a short
    /// transfer; `zero` is the error of a call that moves nothing. Returns the calls made.
    ///
    /// # Safety
    ///
    /// Every pointer must be valid for what `call` does with `len` bytes there.
    unsafe fn vectored(
        &self,
        offset: u64,
        pages: &[*mut u8],
        len: usize,
        zero: io::ErrorKind,
        call: impl Fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> isize,
    ) -> io::Result<u64> {
        let iov: Vec<libc::iovec> = pages
            .iter()
            .map(|&p| libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            })
            .collect();
        let total = pages.len() * len;
        let mut done = 0usize;
        let mut calls = 0;
        while done < total {
            let first = done / len;
            let mut v = iov[first..].to_vec();
            v[0].iov_base = v[0].iov_base.cast::<u8>().wrapping_add(done % len).cast();
            v[0].iov_len -= done % len;
            let at = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            // The count fits an int: callers batch at most IOV_MAX pages.
            let n = call(
                self.file.as_raw_fd(),
                v.as_ptr(),
                v.len() as libc::c_int,
                at,
            );
            calls += 1;
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(zero));
            }
            done += n as usize;
        }
        Ok(calls)
    }

    /// Reads `len` bytes at `offset` into `dst`.
    ///
    /// # Safety
    ///
    /// `dst` must be valid for writes of `len` bytes and not read or written by anyone
    /// else during the call.
    pub unsafe fn read_page(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // SAFETY: by the caller's contract `dst` is `len` writable bytes that nobody
        // else accesses during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        self.file.read_exact_at(buf, offset)
    }
}

/// An anonymous shared-memory file holding a node's frames.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
    len: u64,
}

impl Memfd {
    /// Creates a memfd of `len` bytes (all reading as zero, none resident yet).
    pub fn create(name: &str, len: u64) -> Result<Memfd, HostError> {
        let err = |source| HostError::Memfd { bytes: len, source };
        let cname =
            CString::new(name).map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the
        // flags are valid for memfd_create.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: `fd` is a valid memfd owned by us.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Memfd { fd, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the memfd has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns `offset .. offset + len` to the host: the range reads as zero afterwards and
    /// holds no host memory until written again.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), HostError> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate(mode, offset, len)
            .map_err(|source| HostError::Punch {
                offset,
                bytes: len,
                source,
            })
    }

    /// Allocates host memory for all of the memfd now (`fallocate`), so that later first
    /// touches do not pay for it. The contents still read as zero.
    pub fn allocate_all(&self) -> Result<(), HostError> {
        self.allocate(0, self.len)
    }

    /// Allocates host memory for `offset .. offset + len` now (`fallocate`); the contents
    /// are unchanged (zero where nothing was written).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), HostError> {
        self.fallocate(0, offset, len)
            .map_err(|source| HostError::Allocate {
                offset,
                bytes: len,
                source,
            })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (o, l) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        // SAFETY: `fd` is a valid memfd; with mode 0 (allocate) or PUNCH_HOLE|KEEP_SIZE,
        // fallocate only changes which blocks back the file, never what a mapping reads
        // except that punched ranges read as zero.
        if unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, o, l) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Bytes of host memory the memfd holds now (resident or swapped by the host).
    pub fn allocated_bytes(&self) -> Result<u64, HostError> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is valid for writes of a `stat`; `fd` is valid.
        let rc = unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(HostError::Stat(io::Error::last_os_error()));
        }
        // SAFETY: fstat succeeded, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A shared, read-write mapping of a whole memfd: a node's direct map.
#[derive(Debug)]
pub struct DirectMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; who may touch which bytes is decided by
// frame ownership in the manager, not by the mapping object, which is never moved.
unsafe impl Send for DirectMap {}
// SAFETY: as above; `&DirectMap` only hands out raw pointers.
unsafe impl Sync for DirectMap {}

impl DirectMap {
    /// Maps all of `memfd` read-write and shared.
    pub fn new(memfd: &Memfd) -> Result<DirectMap, HostError> {
        let len = usize::try_from(memfd.len()).map_err(|_| HostError::Map {
            bytes: memfd.len(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), of a valid fd, with
        // a length equal to the file's size; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(HostError::Map {
                bytes: memfd.len(),
                source: io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| HostError::Map {
            bytes: memfd.len(),
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        })?;
        Ok(DirectMap { base, len })
    }

    /// The mapping's first byte.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills the mapping's host page tables now (`MADV_POPULATE_WRITE`), so that first
    /// accesses through the direct map do not fault. Best effort: older hosts lack it.
    pub fn populate(&self) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: advice on our own mapping; it changes no contents.
        unsafe {
            libc::madvise(self.base.as_ptr().cast(), self.len, MADV_POPULATE_WRITE);
        }
    }

    /// Binds the pages of the mapping to host NUMA node `node` (MPOL_BIND).
    pub fn bind_to_host_node(&self, node: u32) -> Result<(), HostError> {
        if !std::path::Path::new(&format!("/sys/devices/system/node/node{node}")).exists() {
            return Err(HostError::NoSuchHostNode(node));
        }
        const MPOL_BIND: libc::c_long = 2;
        let bits = u64::BITS;
        let words = (node / bits + 1) as usize;
        let mut mask = vec![0u64; words];
        mask[(node / bits) as usize] |= 1 << (node % bits);
        // SAFETY: mbind only changes the memory policy of our own mapping
        // `base .. base + len`; `mask` is valid for `words * 64` bits.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.base.as_ptr(),
                self.len,
                MPOL_BIND,
                mask.as_ptr(),
                (words * bits as usize) as libc::c_ulong + 1,
                0 as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(HostError::Mbind {
                node,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for DirectMap {
    fn drop(&mut self) {
        // SAFETY: `base .. base + len` is our own mapping, created in `new`; nothing
        // refers to it after the owner is dropped.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// The CPU the calling thread runs on (may change right after the call; a hint).
#[inline]
pub fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(0)
}

/// The number of CPUs the host has configured (an upper bound on `current_cpu() + 1`).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_punch_returns_memory_and_reads_zero() {
        let fd = Memfd::create("t", 1 << 20).unwrap();
        let map = DirectMap::new(&fd).unwrap();
        // SAFETY: the mapping is 1 MiB long and only this test uses it.
        unsafe { std::ptr::write_bytes(map.base(), 0xAB, 1 << 20) };
        assert!(fd.allocated_bytes().unwrap() >= 1 << 20);
        fd.punch_hole(0, 1 << 20).unwrap();
        assert_eq!(fd.allocated_bytes().unwrap(), 0);
        // SAFETY: in bounds of the mapping.
        assert_eq!(unsafe { *map.base().add(4096) }, 0);
    }

    #[test]
    fn binding_to_a_missing_host_node_is_a_clear_error() {
        let fd = Memfd::create("t", 1 << 16).unwrap();
        let map = DirectMap::new(&fd).unwrap();
        let e = map.bind_to_host_node(4000).unwrap_err();
        assert!(matches!(e, HostError::NoSuchHostNode(4000)), "{e}");
    }

    #[test]
    fn current_cpu_is_below_cpu_count() {
        assert!(current_cpu() < cpu_count());
    }
}
