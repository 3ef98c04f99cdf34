//! This process's end of one worker: its two sockets, its process, and what a host-MMU
//! call on one of its VMs answers.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex as FairMutex, MutexGuard as FairGuard};

use guestmem::mmu::HostMmuError;

use super::WorkerError;
use super::ctl;
use super::wire::{Dec, Enc, MmuOp, WireError};
use crate::sys::ipc::Seqpacket;

/// This process's end of one worker.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) pid: u32,
    /// The two sockets; each is handed on in turn (`unlock_fair`) to the request that
    /// waited longest, so one VM's slices of waiting cannot keep a sibling's out.
    pub(super) control: FairMutex<(Seqpacket, Vec<u8>)>,
    pub(super) waits: FairMutex<(Seqpacket, Vec<u8>)>,
    pub(super) child: Mutex<Option<std::process::Child>>,
    /// Set once the worker is known to have exited (and was reaped): nothing of its
    /// address space, windows included, is left.
    pub(super) gone: AtomicBool,
    pub(super) status: Mutex<String>,
    /// How long a request may go unanswered (ms) before the worker is taken as hung,
    /// ended and reaped ([`ANSWER_WITHIN`] unless the pool was told otherwise).
    pub(super) answer_ms: AtomicU64,
}

/// How long a worker may leave a request unanswered before it is taken as hung: ended,
/// reaped, its VMs gone (the others run on). Every request a worker serves is short
/// (a shell batch, a host mapping call, a state load); a command's wait goes in slices
/// of at most [`super::WAIT_SLICE`], each due this long after its slice ends.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// How long a worker whose pool is gone may take to exit before it is ended.
const EXIT_WITHIN: Duration = Duration::from_secs(2);

/// One reply (tag first) and the descriptors it carried.
pub(super) type Reply = (Vec<u8>, Vec<OwnedFd>);

impl Link {
    /// How long a request may go unanswered.
    pub(super) fn answer_within(&self) -> Duration {
        Duration::from_millis(self.answer_ms.load(Ordering::Relaxed))
    }

    /// When a request sent now must be answered by (`None`: a limit past what an
    /// [`Instant`] holds, which is no limit).
    pub(super) fn answer_by(&self) -> Option<Instant> {
        Instant::now().checked_add(self.answer_within())
    }

    /// One control request and its reply.
    pub(super) fn exchange(
        &self,
        which: &FairMutex<(Seqpacket, Vec<u8>)>,
        msg: &Enc,
    ) -> Result<Reply, WorkerError> {
        self.exchange_within(which, msg, Some(self.answer_within()))
    }

    /// One request and its reply on `sock`, the reply due `within` of the send (`None`:
    /// no limit; counted from the send, not from the wait for the socket). A send that fails here (a message too long, no buffer space) leaves the
    /// worker as it was; a broken socket, end of file or a missed deadline ends it (a
    /// late reply would answer the next request) and reaps it.
    pub(super) fn exchange_within(
        &self,
        which: &FairMutex<(Seqpacket, Vec<u8>)>,
        msg: &Enc,
        within: Option<Duration>,
    ) -> Result<Reply, WorkerError> {
        if self.gone.load(Ordering::Acquire) {
            return Err(self.gone_error());
        }
        let mut g = which.lock();
        // Checked again under the lock: a request that failed while this one waited
        // for the socket has ended the worker.
        if self.gone.load(Ordering::Acquire) {
            FairGuard::unlock_fair(g);
            return Err(self.gone_error());
        }
        let (sock, buf) = &mut *g;
        let io = |source| WorkerError::Io {
            pid: self.pid,
            source,
        };
        if let Err(e) = sock.send(&msg.0, &[]) {
            FairGuard::unlock_fair(g);
            return Err(if peer_gone(&e) {
                self.lost(io(e))
            } else {
                io(e)
            });
        }
        let mut fds = Vec::new();
        // A deadline past what an Instant holds is no deadline.
        let deadline = within.and_then(|t| Instant::now().checked_add(t));
        match sock.recv_by(buf, &mut fds, deadline) {
            Ok(true) => {}
            Ok(false) => {
                sock.shutdown();
                FairGuard::unlock_fair(g);
                return Err(self.lost(io(io::Error::from(io::ErrorKind::UnexpectedEof))));
            }
            Err(e) => {
                // Shut down before the socket is let go: a request queued behind this
                // one must fail, not read this one's late reply as its own (even if
                // the worker cannot be reaped below).
                sock.shutdown();
                FairGuard::unlock_fair(g);
                if e.kind() == io::ErrorKind::TimedOut {
                    tracing::error!(
                        "worker process {} left a request unanswered for {:?}: ending it",
                        self.pid,
                        self.answer_within()
                    );
                }
                return Err(self.lost(io(e)));
            }
        }
        let reply = buf.clone();
        FairGuard::unlock_fair(g);
        Ok((reply, fds))
    }

    /// A control request; the reply (check it with [`Link::ok`]).
    pub(super) fn call(&self, msg: &Enc) -> Result<Reply, WorkerError> {
        self.exchange(&self.control, msg)
    }

    /// A control request whose reply carries nothing but its status.
    pub(super) fn call_ok(&self, msg: &Enc, vm: u32) -> Result<(), WorkerError> {
        let (r, _) = self.call(msg)?;
        self.ok(&r, vm).map(|_| ())
    }

    /// The reader past an `OK` reply's tag, or the worker's error.
    pub(super) fn ok<'a>(&self, reply: &'a [u8], vm: u32) -> Result<Dec<'a>, WorkerError> {
        let (tag, mut d) = Dec::new(reply)?;
        match tag {
            ctl::OK => Ok(d),
            ctl::GONE => Err(WorkerError::NoSuchVm { pid: self.pid, vm }),
            ctl::TIMEOUT => Err(WorkerError::Timeout),
            _ => {
                let what = d.string()?;
                let host_limit = d.u8().is_ok_and(|b| b != 0);
                Err(WorkerError::Refused {
                    pid: self.pid,
                    what,
                    host_limit,
                })
            }
        }
    }

    /// The worker stopped answering: wait for it to exit (it is ours, and its sockets
    /// are closed or broken), so that its address space is gone before any of its VMs'
    /// host views is treated as gone.
    pub(super) fn lost(&self, e: WorkerError) -> WorkerError {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = child.take() {
            // A broken socket or a hung worker: end it (a no-op if it has exited).
            let _ = c.kill();
            match c.wait() {
                Ok(status) => {
                    tracing::error!("worker process {} is gone ({status}): {e}", self.pid);
                    *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status.to_string();
                    self.gone.store(true, Ordering::Release);
                }
                // Not reaped: its address space may still exist, so its VMs' views are
                // never taken as gone (their frames stay held, nothing is handed on).
                Err(w) => tracing::error!(
                    "worker process {} could not be reaped ({w}) after: {e}",
                    self.pid
                ),
            }
        }
        drop(child);
        if self.gone.load(Ordering::Acquire) {
            self.gone_error()
        } else {
            e
        }
    }

    /// Ends and reaps the worker (one that failed to start: quietly).
    pub(super) fn end(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = child {
            let _ = c.kill();
            if c.wait().is_ok() {
                self.gone.store(true, Ordering::Release);
            }
        }
    }

    /// Whether the worker has exited (reaped here if it has), without ending it. A
    /// process closes its sockets before it can be reaped, so this waits up to 100 ms.
    pub(super) fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            let Some(c) = child.as_mut() else { break };
            if let Ok(Some(status)) = c.try_wait() {
                tracing::error!("worker process {} is gone ({status})", self.pid);
                *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status.to_string();
                *child = None;
                self.gone.store(true, Ordering::Release);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(child);
        self.gone.load(Ordering::Acquire)
    }

    pub(super) fn gone_error(&self) -> WorkerError {
        WorkerError::Gone {
            pid: self.pid,
            status: self
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// A host-MMU call on VM `vm` over the control socket.
    pub(super) fn mmu(&self, vm: u32, op: MmuOp, out: &mut Vec<u64>) -> Result<bool, HostMmuError> {
        let msg = op.put(Enc::new(ctl::MMU).u32(vm));
        match self.exchange(&self.control, &msg) {
            Ok((reply, _)) => mmu_reply(op, &reply, out),
            Err(WorkerError::Gone { .. }) => gone_view(op, "the worker process is gone"),
            Err(e) => Err(mmu_error(op, io::Error::other(e.to_string()))),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut c) = child {
            // Shutting the sockets down ends the worker's loops; wait for it so that no
            // VM (and no window onto the pool's frames) outlives the pool. One that
            // does not exit within EXIT_WITHIN is hung: end it. The bound is short
            // because the last holder may be a fault-serving thread.
            for m in [&mut self.control, &mut self.waits] {
                m.get_mut().0.shutdown();
            }
            let by =
                Instant::now() + Duration::from_millis(*self.answer_ms.get_mut()).min(EXIT_WITHIN);
            while matches!(c.try_wait(), Ok(None)) {
                if Instant::now() >= by {
                    tracing::error!("worker process {} did not exit: ending it", self.pid);
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Whether a send failed because the peer's end is gone (not for a reason of this end's).
pub(super) fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

pub(super) fn mmu_error(op: MmuOp, source: io::Error) -> HostMmuError {
    let (gfn, pages) = op.run();
    HostMmuError {
        op: op.name(),
        gfn,
        pages,
        source,
    }
}

/// What a host-MMU call on a view that no longer exists means: nothing maps the frames
/// any more, so taking them away succeeded; giving them is refused.
pub(super) fn gone_view(op: MmuOp, why: &str) -> Result<bool, HostMmuError> {
    match op {
        MmuOp::Unmap(..)
        | MmuOp::Protect(_, _, false)
        | MmuOp::ProtectForFork(..)
        | MmuOp::Revoke(..) => Ok(true),
        MmuOp::Restore(..) | MmuOp::Harvest(..) => Ok(false),
        MmuOp::Map { .. } | MmuOp::Protect(_, _, true) => {
            Err(mmu_error(op, io::Error::other(why.to_string())))
        }
    }
}

/// Decodes the worker's answer to a host-MMU call (the whole message, tag first).
pub(super) fn mmu_reply(op: MmuOp, msg: &[u8], out: &mut Vec<u64>) -> Result<bool, HostMmuError> {
    let bad = |e: WireError| mmu_error(op, io::Error::other(e.to_string()));
    let (tag, mut d) = Dec::new(msg).map_err(bad)?;
    match tag {
        ctl::OK => {
            let b = d.u8().map_err(bad)? != 0;
            let n = d.u32().map_err(bad)?;
            let want = match op {
                MmuOp::Harvest(_, pages) if b => pages.div_ceil(64),
                _ => u64::from(n),
            };
            if u64::from(n) != want {
                return Err(bad(WireError("an accessed bitmap of the wrong length")));
            }
            for _ in 0..n {
                out.push(d.u64().map_err(bad)?);
            }
            Ok(b)
        }
        ctl::GONE => gone_view(op, "the worker no longer holds the VM"),
        _ => {
            let errno = d.u32().map_err(bad)? as i32;
            let what = d.string().map_err(bad)?;
            Err(mmu_error(
                op,
                if errno != 0 {
                    io::Error::from_raw_os_error(errno)
                } else {
                    io::Error::other(what)
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A link to a stand-in worker (a `sleep` process) whose requests `peer` answers.
    fn link(answer_ms: u64) -> (Link, Seqpacket) {
        let (control, peer) = Seqpacket::pair().expect("socketpair");
        let (waits, _) = Seqpacket::pair().expect("socketpair");
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let link = Link {
            pid: child.id(),
            control: FairMutex::new((control, Vec::with_capacity(4096))),
            waits: FairMutex::new((waits, Vec::with_capacity(4096))),
            child: Mutex::new(Some(child)),
            gone: AtomicBool::new(false),
            status: Mutex::new(String::new()),
            answer_ms: AtomicU64::new(answer_ms),
        };
        (link, peer)
    }

    #[test]
    fn a_request_queued_behind_one_that_timed_out_never_reads_its_late_reply() {
        let (link, peer) = link(300);
        let (received, first_in) = std::sync::mpsc::channel();
        let peer = std::thread::spawn(move || {
            let (mut buf, mut fds) = (Vec::with_capacity(4096), Vec::new());
            // The first request is answered late, after its deadline; then any
            // request that still arrives is answered at once.
            if peer.recv(&mut buf, &mut fds).unwrap_or(false) {
                let _ = received.send(());
                std::thread::sleep(Duration::from_millis(800));
                let _ = peer.send(b"late", &[]);
            }
            while peer.recv(&mut buf, &mut fds).unwrap_or(false) {
                let _ = peer.send(b"second", &[]);
            }
        });
        std::thread::scope(|s| {
            let first = s.spawn(|| link.call(&Enc::new(1)));
            // Queued behind the first (which holds the socket once the peer has its
            // request), with a deadline well past its late reply.
            first_in
                .recv_timeout(Duration::from_secs(10))
                .expect("the peer received the first request");
            let second =
                link.exchange_within(&link.control, &Enc::new(2), Some(Duration::from_secs(5)));
            let first = first.join().expect("first");
            assert!(first.is_err(), "the first request missed its deadline");
            match second {
                Ok((reply, _)) => panic!(
                    "the queued request read {:?} as its answer",
                    String::from_utf8_lossy(&reply)
                ),
                Err(e) => assert!(matches!(e, WorkerError::Gone { .. }), "{e}"),
            }
        });
        assert!(
            link.gone.load(Ordering::Acquire),
            "the stand-in was ended and reaped"
        );
        drop(link);
        peer.join().expect("peer");
    }

    #[test]
    fn a_request_waiting_for_the_socket_gets_it_before_the_holder_takes_it_again() {
        let (link, peer) = link(5_000);
        // Every request is answered 5 ms after it arrives, as a worker answers a wait
        // slice whose command is still running.
        let peer = std::thread::spawn(move || {
            let (mut buf, mut fds) = (Vec::with_capacity(4096), Vec::new());
            while peer.recv(&mut buf, &mut fds).unwrap_or(false) {
                std::thread::sleep(Duration::from_millis(5));
                let _ = peer.send(b"ok", &[]);
            }
        });
        let turns = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            // One VM waiting in back-to-back slices, as `RemoteVm::wait(None)` does (on
            // the stand-in's one answering socket).
            s.spawn(|| {
                // Each on a CPU of its own (where there are two): the holder takes
                // the socket again long before a parked sibling wakes.
                crate::numa::Pin::Cpu(0).apply();
                while !done.load(Ordering::Acquire) && turns.load(Ordering::Relaxed) < 400 {
                    link.exchange(&link.control, &Enc::new(1)).expect("slice");
                    turns.fetch_add(1, Ordering::Relaxed);
                }
            });
            crate::numa::Pin::Cpu(1).apply();
            while turns.load(Ordering::Relaxed) < 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
            // A sibling's wait: it gets the socket after the slice in flight, not
            // after the other has let go of it.
            let before = turns.load(Ordering::Relaxed);
            link.exchange(&link.control, &Enc::new(2)).expect("sibling");
            let waited = turns.load(Ordering::Relaxed) - before;
            done.store(true, Ordering::Release);
            // Fair: at most the slice in flight and one begun before this thread
            // queued; the bound leaves room for this thread being preempted on a
            // loaded machine (the std mutex let 20 to 397 slices go first here).
            assert!(
                waited <= 10,
                "the sibling's request waited behind {waited} of the other's slices"
            );
        });
        drop(link);
        peer.join().expect("peer");
    }
}
