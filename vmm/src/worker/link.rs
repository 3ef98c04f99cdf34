//! This process's end of one worker: its two sockets, its process, and what a host-MMU
//! call on one of its VMs answers.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::mmu::HostMmuError;

use super::WorkerError;
use super::ctl;
use super::wire::{Dec, Enc, MmuOp, WireError};
use crate::sys::ipc::Seqpacket;

/// This process's end of one worker.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) pid: u32,
    pub(super) control: Mutex<(Seqpacket, Vec<u8>)>,
    pub(super) waits: Mutex<(Seqpacket, Vec<u8>)>,
    pub(super) child: Mutex<Option<std::process::Child>>,
    /// Set once the worker is known to have exited (and was reaped): nothing of its
    /// address space, windows included, is left.
    pub(super) gone: AtomicBool,
    pub(super) status: Mutex<String>,
}

/// One reply (tag first) and the descriptors it carried.
pub(super) type Reply = (Vec<u8>, Vec<OwnedFd>);

impl Link {
    /// One request and its reply on `sock`.
    pub(super) fn exchange(
        &self,
        which: &Mutex<(Seqpacket, Vec<u8>)>,
        msg: &Enc,
    ) -> Result<Reply, WorkerError> {
        if self.gone.load(Ordering::Acquire) {
            return Err(self.gone_error());
        }
        let mut g = which.lock().unwrap_or_else(|e| e.into_inner());
        let (sock, buf) = &mut *g;
        let io = |source| WorkerError::Io {
            pid: self.pid,
            source,
        };
        if let Err(e) = sock.send(&msg.0, &[]) {
            drop(g);
            return Err(self.lost(io(e)));
        }
        let mut fds = Vec::new();
        match sock.recv(buf, &mut fds) {
            Ok(true) => {}
            Ok(false) => {
                drop(g);
                return Err(self.lost(io(io::Error::from(io::ErrorKind::UnexpectedEof))));
            }
            Err(e) => {
                drop(g);
                return Err(self.lost(io(e)));
            }
        }
        Ok((buf.clone(), fds))
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
            // A broken socket with the worker still alive (it should not be): end it.
            let _ = c.kill();
            let status = c
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| format!("not reaped: {e}"));
            tracing::error!("worker process {} is gone ({status}): {e}", self.pid);
            *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
            self.gone.store(true, Ordering::Release);
        }
        drop(child);
        if self.gone.load(Ordering::Acquire) {
            self.gone_error()
        } else {
            e
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
            // Closing the sockets (the fields, after this) ends the worker's loop; wait
            // for it so that no VM outlives the pool.
            let (control, waits) = (
                std::mem::replace(&mut self.control, Mutex::new(dead_pair())),
                std::mem::replace(&mut self.waits, Mutex::new(dead_pair())),
            );
            drop((control, waits));
            let _ = c.wait();
        }
    }
}

pub(super) fn dead_pair() -> (Seqpacket, Vec<u8>) {
    // A socket whose peer is already closed; only a placeholder while dropping.
    match Seqpacket::pair() {
        Ok((a, _b)) => (a, Vec::new()),
        Err(_) => panic!("socketpair failed while dropping a worker link"),
    }
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
