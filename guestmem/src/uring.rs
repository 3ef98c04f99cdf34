//! The io_uring layer of the swap device: vectored writes submitted to the kernel and
//! reaped later, so that the reclaiming thread unmaps its next batch while the previous
//! one is written (the `io-uring` crate; one ring per swap device).
//!
//! Requests are flagged `IOSQE_ASYNC`: a buffered write to a file would otherwise often
//! complete inline, inside the submitting call, which is the synchronous `pwritev`
//! again. The kernel's io-wq workers do the copies instead.
//!
//! Completions are reaped by whichever thread waits next and kept by request id, so
//! threads sharing the ring (the background reclaimer, direct reclaim from faults) each
//! collect their own.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};

/// Requests the ring holds in flight at most (a batch of reclaim is a few runs).
const ENTRIES: u32 = 64;

/// A request's id, given at submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// One io_uring instance with the results of requests not yet collected.
pub struct Ring {
    ring: IoUring,
    done: HashMap<u64, i32>,
    next: u64,
    in_flight: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .field("uncollected", &self.done.len())
            .finish()
    }
}

impl Ring {
    /// A new ring; fails where the host has io_uring disabled
    /// (`kernel.io_uring_disabled`, seccomp).
    pub fn new() -> io::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(ENTRIES)?,
            done: HashMap::new(),
            next: 0,
            in_flight: 0,
        })
    }

    /// Submits a `pwritev` of `iov` at `offset` of `fd`.
    ///
    /// # Safety
    ///
    /// `iov` and every buffer it names must stay valid, and the buffers unwritten, until
    /// [`Ring::wait`] has returned this request's result. `fd` must stay open as long.
    pub unsafe fn writev(
        &mut self,
        fd: RawFd,
        iov: &[libc::iovec],
        offset: u64,
    ) -> io::Result<RequestId> {
        let len =
            u32::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let id = self.next;
        self.next += 1;
        let sqe = opcode::Writev::new(types::Fd(fd), iov.as_ptr(), len)
            .offset(offset)
            .build()
            .flags(squeue::Flags::ASYNC)
            .user_data(id);
        // Make room: a full submission queue is flushed to the kernel; a full ring (as
        // many in flight as it has entries) is reaped first.
        while self.in_flight >= ENTRIES as usize {
            self.reap(1)?;
        }
        // SAFETY: the entry names `iov` and its buffers, which the caller keeps valid
        // until the result is collected.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit()?;
        }
        self.ring.submit()?;
        self.in_flight += 1;
        Ok(RequestId(id))
    }

    /// Waits for request `id` and returns its result (bytes written, or the error).
    pub fn wait(&mut self, id: RequestId) -> io::Result<usize> {
        loop {
            if let Some(res) = self.done.remove(&id.0) {
                return usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res));
            }
            self.reap(1)?;
        }
    }

    /// Waits for at least `min` completions and files every available one by id.
    fn reap(&mut self, min: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(min) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            self.done.insert(cqe.user_data(), cqe.result());
            self.in_flight -= 1;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn writes_complete_by_id_in_any_order() {
        let Ok(mut ring) = Ring::new() else {
            eprintln!("io_uring is disabled on this host: nothing to test");
            return;
        };
        let f = tempfile_in_tmp();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let iov_a = [libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        }];
        let iov_b = [libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        }];
        // SAFETY: the buffers and iovecs outlive both waits below.
        let ia = unsafe { ring.writev(f.as_raw_fd(), &iov_a, 0) }.unwrap();
        // SAFETY: as above.
        let ib = unsafe { ring.writev(f.as_raw_fd(), &iov_b, 4096) }.unwrap();
        assert_eq!(ring.wait(ib).unwrap(), 4096);
        assert_eq!(ring.wait(ia).unwrap(), 4096);
        let got = std::fs::read(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert_eq!(&got[..4096], &a[..]);
        assert_eq!(&got[4096..], &b[..]);
    }

    #[test]
    fn an_error_comes_back_as_the_requests_result() {
        let Ok(mut ring) = Ring::new() else {
            return;
        };
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let a = [0u8; 16];
        let iov = [libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        }];
        // SAFETY: the buffer and iovec outlive the wait.
        let id = unsafe { ring.writev(f.as_raw_fd(), &iov, 0) }.unwrap();
        let e = ring.wait(id).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("kvmm-uring-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
