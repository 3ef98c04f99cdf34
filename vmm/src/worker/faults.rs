//! Worker VMs' faults, resolved in this process: the fault server's threads, one
//! connection per VM, and the host view ([`RemoteMmu`]) of a worker VM's window.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use guestmem::mmu::{HostMmu, HostMmuError, MapRun};
use guestmem::types::Gfn;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::fault_msg;
use super::link::{Link, gone_view, mmu_error, mmu_reply};
use super::wire::{self, Dec, Enc, MmuOp, WireError};
use crate::fault::{FaultError, FaultKind, FaultResolver};
use crate::managed::SpaceResolver;
use crate::sys::ipc::Seqpacket;

thread_local! {
    /// The fault connection this thread is serving (its host-MMU calls for that VM go
    /// back on it, to the handler waiting there).
    static SERVING: RefCell<Option<Arc<FaultConn>>> = const { RefCell::new(None) };
    /// Buffer for replies read while serving.
    static NESTED_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(64 << 10));
}

/// The host view of a worker VM's window ([`HostMmu`] by request; see the module docs).
#[derive(Debug)]
pub struct RemoteMmu {
    pub(super) link: Arc<Link>,
    pub(super) vm: u32,
}

impl RemoteMmu {
    /// Harvest replies stay well under a message: this many pages per request.
    const HARVEST_CHUNK: u64 = 1 << 18;

    pub(super) fn call(&self, op: MmuOp, out: &mut Vec<u64>) -> Result<bool, HostMmuError> {
        let nested = SERVING.with(|s| {
            s.borrow()
                .as_ref()
                .filter(|c| Arc::ptr_eq(&c.link, &self.link) && c.vm == self.vm)
                .cloned()
        });
        match nested {
            Some(conn) => conn.nested(op, out),
            None => self.link.mmu(self.vm, op, out),
        }
    }
}

impl HostMmu for RemoteMmu {
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        let op = MmuOp::Map {
            gfn: run.gfn,
            pages: run.pages,
            node: run.node,
            pfn: run.pfn,
            file_offset: run.file_offset,
            writable: run.writable,
        };
        self.call(op, &mut Vec::new()).map(|_| ())
    }
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.call(MmuOp::Unmap(gfn, pages), &mut Vec::new())
            .map(|_| ())
    }
    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError> {
        self.call(MmuOp::Protect(gfn, pages, writable), &mut Vec::new())
            .map(|_| ())
    }
    fn protect_for_fork(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.call(MmuOp::ProtectForFork(gfn, pages), &mut Vec::new())
            .map(|_| ())
    }
    fn revoke(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.call(MmuOp::Revoke(gfn, pages), &mut Vec::new())
            .map(|_| ())
    }
    fn restore_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<bool, HostMmuError> {
        self.call(MmuOp::Restore(gfn, pages, writable), &mut Vec::new())
    }
    fn harvest_accessed(
        &self,
        gfn: Gfn,
        pages: u64,
        out: &mut Vec<u64>,
    ) -> Result<bool, HostMmuError> {
        out.clear();
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(Self::HARVEST_CHUNK);
            if !self.call(MmuOp::Harvest(gfn.offset(done), n), out)? {
                out.clear();
                return Ok(false);
            }
            done += n;
            out.truncate(done.div_ceil(64) as usize);
        }
        Ok(true)
    }
}

/// One worker VM's fault socket, served by this process.
#[derive(Debug)]
pub(super) struct FaultConn {
    pub(super) link: Arc<Link>,
    pub(super) vm: u32,
    pub(super) sock: Seqpacket,
    /// Held while a request is served; `true` once closed.
    pub(super) serving: Mutex<bool>,
    pub(super) resolver: SpaceResolver,
    pub(super) key: u64,
}

impl FaultConn {
    /// A host-MMU call made while serving this connection: sent to the handler that
    /// waits on it.
    pub(super) fn nested(&self, op: MmuOp, out: &mut Vec<u64>) -> Result<bool, HostMmuError> {
        let msg = op.put(Enc::new(fault_msg::MMU));
        let io_err = |e: io::Error| mmu_error(op, e);
        self.sock.send(&msg.0, &[]).map_err(io_err)?;
        NESTED_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let mut fds = Vec::new();
            let got = match self.sock.recv_by(&mut buf, &mut fds, self.link.answer_by()) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    // A late answer must not be read as the next call's.
                    self.sock.shutdown();
                    // The handler is stuck mid-fault: this thread serves every worker's
                    // VMs, so it may not wait on; the worker is ended (its VMs go).
                    tracing::error!(
                        "worker process {} left a fault's mapping call unanswered for {:?}: ending it",
                        self.link.pid,
                        self.link.answer_within()
                    );
                    let e = self.link.lost(super::WorkerError::Io {
                        pid: self.link.pid,
                        source: e,
                    });
                    return match e {
                        super::WorkerError::Gone { .. } => {
                            gone_view(op, "the worker process is gone")
                        }
                        e => Err(mmu_error(op, io::Error::other(e.to_string()))),
                    };
                }
                Err(e) => {
                    // Whatever was left unread would answer the next call: this VM's
                    // connection ends (its handler sees end of file).
                    self.sock.shutdown();
                    return Err(io_err(e));
                }
            };
            if !got {
                // The worker is gone mid-fault, or only this VM's handler let go of
                // its socket: then the VM's window may still be mapped, and nothing
                // may be taken as unmapped. A sibling's worker is not ended for it.
                return if self.link.exited() {
                    gone_view(op, "the worker process is gone")
                } else {
                    Err(mmu_error(
                        op,
                        io::Error::other("the VM's fault handler closed its fault socket"),
                    ))
                };
            }
            mmu_reply(op, &buf, out)
        })
    }

    /// Serves one request; `false` when the connection is closed.
    pub(super) fn serve_one(self: &Arc<Self>, buf: &mut Vec<u8>) -> bool {
        let mut closed = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return false;
        }
        let mut fds = Vec::new();
        match self.sock.recv(buf, &mut fds) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                *closed = true;
                return false;
            }
        }
        let reply = match self.decode(buf) {
            Ok((gfn, kind, node)) => {
                guestmem::set_home_node(node);
                SERVING.with(|s| *s.borrow_mut() = Some(self.clone()));
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.resolver.resolve_run(gfn, kind)
                }))
                .unwrap_or_else(|_| {
                    Err(FaultError::Panicked("resolving a worker VM's fault".into()))
                });
                SERVING.with(|s| *s.borrow_mut() = None);
                match r {
                    Ok(run) => Enc::new(fault_msg::RESOLVED)
                        .u64(run.start.0)
                        .u64(run.end.0),
                    Err(e) => Enc::new(fault_msg::FAILED)
                        .u8(u8::from(e.is_host_limit()))
                        .bytes(e.to_string().as_bytes()),
                }
            }
            Err(e) => Enc::new(fault_msg::FAILED)
                .u8(0)
                .bytes(e.to_string().as_bytes()),
        };
        if self.sock.send(&reply.0, &[]).is_err() {
            *closed = true;
            return false;
        }
        true
    }

    pub(super) fn decode(
        &self,
        buf: &[u8],
    ) -> Result<(Gfn, FaultKind, guestmem::types::NodeId), WireError> {
        let (tag, mut d) = Dec::new(buf)?;
        if tag != fault_msg::RESOLVE {
            return Err(WireError("expected a fault"));
        }
        let gfn = Gfn(d.u64()?);
        let kind = wire::get_kind(&mut d)?;
        let node = d.u32()?;
        Ok((
            gfn,
            kind,
            guestmem::types::NodeId(u16::try_from(node).map_err(|_| WireError("node id"))?),
        ))
    }
}

/// This process's threads that resolve worker VMs' faults (epoll over every fault
/// socket, one request per wake-up and socket). The last reference (the pool's, its
/// shells' and VMs') stops and joins them.
#[derive(Debug)]
pub struct FaultServer {
    pub(super) core: Arc<ServerCore>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What the fault server's threads share (they hold this, never the [`FaultServer`]).
#[derive(Debug)]
pub(super) struct ServerCore {
    pub(super) epoll: Epoll,
    pub(super) stop: EventFd,
    pub(super) conns: Mutex<HashMap<u64, Arc<FaultConn>>>,
    pub(super) next: AtomicU64,
}

pub(super) const STOP_KEY: u64 = u64::MAX;

impl FaultServer {
    pub(super) fn new(threads: usize) -> io::Result<Arc<FaultServer>> {
        let core = Arc::new(ServerCore {
            epoll: Epoll::new()?,
            stop: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        core.epoll.ctl(
            ControlOperation::Add,
            core.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_KEY),
        )?;
        // Built first, so that a thread that fails to start stops those already running.
        let s = Arc::new(FaultServer {
            core: core.clone(),
            threads: Mutex::new(Vec::new()),
        });
        for _ in 0..threads.max(1) {
            let me = core.clone();
            let h = std::thread::Builder::new()
                .name("worker-faults".into())
                .spawn(move || me.serve())?;
            s.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        }
        Ok(s)
    }

    pub(super) fn add(&self, conn: FaultConn) -> io::Result<Arc<FaultConn>> {
        self.core.add(conn)
    }

    /// Stops serving `conn`: when this returns no thread is inside one of its requests
    /// and none will start.
    pub(super) fn close(&self, conn: &FaultConn) {
        self.core.close(conn)
    }

    pub(super) fn next_key(&self) -> u64 {
        self.core
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl ServerCore {
    pub(super) fn serve(&self) {
        let mut events = vec![EpollEvent::default(); 8];
        let mut buf = Vec::with_capacity(64 << 10);
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("the worker fault server's epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let key = ev.data();
                if key == STOP_KEY {
                    return;
                }
                let conn = self
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .cloned();
                let Some(conn) = conn else { continue };
                if conn.serve_one(&mut buf) {
                    let _ = self.epoll.ctl(
                        ControlOperation::Modify,
                        conn.sock.as_fd().as_raw_fd(),
                        EpollEvent::new(EventSet::IN | EventSet::ONE_SHOT, key),
                    );
                } else {
                    self.remove(key);
                }
            }
        }
    }

    pub(super) fn add(&self, conn: FaultConn) -> io::Result<Arc<FaultConn>> {
        let conn = Arc::new(conn);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.key, conn.clone());
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.sock.as_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::ONE_SHOT, conn.key),
        ) {
            self.remove(conn.key);
            return Err(e);
        }
        Ok(conn)
    }

    /// Stops serving `conn`: when this returns no thread is inside one of its requests
    /// and none will start.
    pub(super) fn close(&self, conn: &FaultConn) {
        *conn.serving.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.remove(conn.key);
    }

    pub(super) fn remove(&self, key: u64) {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
        {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.sock.as_fd().as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        // Its threads hold only the core, so this never runs on one of them. Every
        // connection left is closed with the core, after them.
        let _ = self.core.stop.write(1);
        for h in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = h.join();
        }
    }
}
