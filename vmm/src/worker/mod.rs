//! Worker processes that hold VMs whose memory this process manages.
//!
//! Every KVM VM of a process is an MMU notifier on the process's one `mm`: creating a VM
//! locks every mapping of the process, and every host mapping change (a window's `mmap`, a
//! thread's stack) calls every VM's notifier, so the cost of one more VM grows with the VMs
//! already there (docs/ARCHITECTURE.md, "Fan-out beyond a few hundred VMs"). A
//! [`WorkerPool`] spreads VMs over worker processes (copies of this program started with
//! [`WORKER_ENV`] set; call [`serve_if_worker`] first thing in `main`):
//!
//! - **This process keeps the memory manager**: pools, frames, address spaces, reclaim,
//!   migration. Each worker gets every node's memfd once, at start.
//! - **A worker holds VMs**: KVM VM and vCPU fds, the guest RAM [`crate::Window`] and
//!   the fault-handler and vCPU threads, exactly as [`crate::Vm`] does in-process.
//! - **Faults**: a worker VM's handler reads its userfaultfd as in-process and resolves
//!   through a resolver that sends the fault over the VM's own fault socket. A thread of
//!   this process's [`FaultServer`] resolves it in the VM's address space, whose host view
//!   is a [`RemoteMmu`]: its host-MMU calls made while serving travel back on the same
//!   socket and the waiting handler applies them to its window before the wake. Host-MMU
//!   calls from elsewhere (reclaim, migration) go over the worker's control socket.
//! - **Containment**: a worker that dies takes only its VMs. Its sockets close; the
//!   process is reaped before any of its VMs' host views is treated as gone, so no frame
//!   is handed on while a stale mapping of it could still exist.
//!
//! [`crate::ManagedVm::fork_remote`] snapshot-forks a VM of this process into clones held
//! by workers ([`RemoteShells`] made beforehand, as [`crate::ShellPool`] does in-process).
//! What does not cross yet: a remote clone cannot itself be forked, moved to a fresh VM,
//! or read from this process (its RAM is only mapped in the worker).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::mmu::HostMmu;
use guestmem::{AddressSpace, Manager};

use crate::fault::{FaultCounts, FaultError};
use crate::guest::{CmdResult, Command};
use crate::managed::SpaceResolver;
use crate::sys::ipc::{MAX_FDS, Seqpacket};
use crate::vm::VmConfig;

mod faults;
mod link;
mod serve;
pub mod wire;

use faults::FaultConn;
pub use faults::{FaultServer, RemoteMmu};
pub use link::ANSWER_WITHIN;
use link::Link;

use wire::{Dec, Enc, WireError};

/// Set in a worker's environment: the program is to serve as a worker
/// ([`serve_if_worker`]).
pub const WORKER_ENV: &str = "KVMM_WORKER";
/// The worker's end of its control socket.
const CONTROL_FD: i32 = 3;
/// The worker's end of its wait socket.
const WAIT_FD: i32 = 4;

/// The longest a worker is asked to wait on one vCPU's command before the wait is
/// sent again (so that the VMs of one worker take turns at its wait socket).
pub const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Control-socket message tags (requests and reply status).
mod ctl {
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
    pub const GONE: u8 = 2;
    pub const TIMEOUT: u8 = 3;
    pub const NODES: u8 = 9;
    pub const SHELLS: u8 = 10;
    pub const MMU: u8 = 11;
    pub const RESTORE: u8 = 12;
    pub const SUBMIT: u8 = 13;
    pub const STOP: u8 = 14;
    pub const DROP: u8 = 15;
    pub const FORGET: u8 = 16;
    pub const COUNTS: u8 = 17;
    /// Fault injection: the worker's next reply fails to send (`failpoints` only).
    #[cfg(feature = "failpoints")]
    pub const FAIL_NEXT_REPLY: u8 = 18;
}

/// Fault-socket message tags.
mod fault_msg {
    pub const RESOLVE: u8 = 1;
    pub const MMU: u8 = 2;
    pub const RESOLVED: u8 = 3;
    pub const FAILED: u8 = 4;
}

/// If this process was started as a worker ([`WORKER_ENV`]), serves as one and exits;
/// otherwise returns at once. Call it first thing in `main` of any program that spawns a
/// [`WorkerPool`] of itself.
pub fn serve_if_worker() {
    if std::env::var_os(WORKER_ENV).is_some() {
        std::process::exit(serve::run());
    }
}

/// A worker or one of its VMs could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker program could not be started.
    #[error("starting a worker process ({exe}) failed: {source}")]
    Spawn {
        /// The program.
        exe: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The worker started but could not serve (it says why: no `/dev/kvm`, ...).
    #[error("the worker process could not start: {0}")]
    Start(String),
    /// The worker process is gone; its VMs are lost (others run on).
    #[error("worker process {pid} exited ({status}); its VMs are gone, the others run on")]
    Gone {
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// Talking to the worker failed.
    #[error("talking to worker process {pid} failed: {source}")]
    Io {
        /// Its pid.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A malformed message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The worker refused (its error).
    #[error("worker process {pid}: {what}")]
    Refused {
        /// Its pid.
        pid: u32,
        /// The worker's error.
        what: String,
        /// Whether it failed on a host limit the user can raise.
        host_limit: bool,
    },
    /// The worker no longer has the VM.
    #[error("worker process {pid} no longer holds VM {vm}")]
    NoSuchVm {
        /// Its pid.
        pid: u32,
        /// The worker's VM id.
        vm: u32,
    },
    /// A command did not end in time (it stays in flight).
    #[error("the command did not end in time")]
    Timeout,
}

impl WorkerError {
    /// Whether it failed on a host limit the user can raise.
    pub fn is_host_limit(&self) -> bool {
        match self {
            WorkerError::Refused { host_limit, .. } => *host_limit,
            WorkerError::Spawn { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN)
            ),
            _ => false,
        }
    }
}

/// Worker processes and the fault server of this process (see the module docs).
#[derive(Debug)]
pub struct WorkerPool {
    links: Vec<Arc<Link>>,
    server: Arc<FaultServer>,
}

impl WorkerPool {
    /// Starts `n` workers running `exe` (a program that calls [`serve_if_worker`]; the
    /// `vmm` program does), each given every node memfd of `mm`'s pool. Worker VMs'
    /// faults are resolved by `threads` threads of this process.
    pub fn spawn(
        exe: &Path,
        n: usize,
        mm: &Manager,
        threads: usize,
    ) -> Result<WorkerPool, WorkerError> {
        let server = FaultServer::new(threads).map_err(|source| WorkerError::Spawn {
            exe: "the fault server threads".into(),
            source,
        })?;
        let mut links = Vec::with_capacity(n);
        for _ in 0..n {
            links.push(Arc::new(Self::start(exe, mm)?));
        }
        Ok(WorkerPool { links, server })
    }

    fn start(exe: &Path, mm: &Manager) -> Result<Link, WorkerError> {
        let spawn_err = |source| WorkerError::Spawn {
            exe: exe.display().to_string(),
            source,
        };
        let (control, their_control) = Seqpacket::pair().map_err(spawn_err)?;
        let (waits, their_waits) = Seqpacket::pair().map_err(spawn_err)?;
        let (c, w) = (
            their_control.as_fd().as_raw_fd(),
            their_waits.as_fd().as_raw_fd(),
        );
        let mut cmd = std::process::Command::new(exe);
        cmd.env(WORKER_ENV, "1")
            .env_remove("RUST_TEST_THREADS")
            .stdin(std::process::Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe calls (fcntl, dup2) on descriptors it inherited: it moves
        // the two socket ends out of the way, then to CONTROL_FD and WAIT_FD (dup2
        // clears close-on-exec on the copies).
        unsafe {
            cmd.pre_exec(move || {
                let c2 = libc::fcntl(c, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if c2 < 0 || w2 < 0 || libc::dup2(c2, CONTROL_FD) < 0 || libc::dup2(w2, WAIT_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().map_err(spawn_err)?;
        drop((their_control, their_waits));
        let pid = child.id();
        let link = Link {
            pid,
            control: parking_lot::Mutex::new((control, Vec::with_capacity(256 << 10))),
            waits: parking_lot::Mutex::new((waits, Vec::with_capacity(4096))),
            child: Mutex::new(Some(child)),
            gone: AtomicBool::new(false),
            status: Mutex::new(String::new()),
            answer_ms: AtomicU64::new(link::ANSWER_WITHIN.as_millis() as u64),
        };
        match Self::handshake(&link, exe, mm) {
            Ok(()) => Ok(link),
            Err(e) => {
                // Whatever it is (a program that never answers, one that failed), it
                // must not outlive this call.
                link.end();
                Err(e)
            }
        }
    }

    /// Its hello (or why it cannot serve), then the node memfds.
    fn handshake(link: &Link, exe: &Path, mm: &Manager) -> Result<(), WorkerError> {
        let spawn_err = |source| WorkerError::Spawn {
            exe: exe.display().to_string(),
            source,
        };
        {
            let g = link.control.lock();
            let mut buf = Vec::with_capacity(4096);
            let mut fds = Vec::new();
            let ok =
                g.0.recv_by(&mut buf, &mut fds, link.answer_by())
                    .map_err(spawn_err)?;
            if !ok {
                return Err(WorkerError::Start(format!(
                    "{} exited before answering (is it a program that calls vmm::worker::serve_if_worker?)",
                    exe.display()
                )));
            }
            let (tag, mut d) = Dec::new(&buf)?;
            if tag != ctl::OK {
                return Err(WorkerError::Start(d.string()?));
            }
            let nodes = mm.pool().nodes();
            let mut msg = Enc::new(ctl::NODES);
            for node in nodes {
                msg = msg.u32(u32::from(node.id().0));
            }
            let fds: Vec<_> = nodes.iter().map(|n| n.memfd()).collect();
            g.0.send(&msg.0, &fds).map_err(spawn_err)?;
        }
        Ok(())
    }

    /// How long a worker may leave a request unanswered before it is taken as hung:
    /// ended and reaped, its VMs gone, the others running on (default
    /// [`link::ANSWER_WITHIN`]).
    pub fn set_answer_within(&self, t: Duration) {
        for l in &self.links {
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
            l.answer_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Workers.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether the pool has no worker.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The fault server, weakly: it (and its threads) end when the pool, its shells and
    /// its VMs are all gone.
    pub fn fault_server(&self) -> std::sync::Weak<FaultServer> {
        Arc::downgrade(&self.server)
    }

    /// Fault injection: worker `worker`'s reply to its next control request fails to
    /// send (as with `ENOMEM`). Only with the `failpoints` feature.
    #[cfg(feature = "failpoints")]
    pub fn fail_next_reply(&self, worker: usize) -> Result<(), WorkerError> {
        let link = self
            .links
            .get(worker)
            .ok_or_else(|| WorkerError::Start(format!("no worker {worker}")))?;
        link.call_ok(&Enc::new(ctl::FAIL_NEXT_REPLY), u32::MAX)
    }

    /// The workers' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.links.iter().map(|l| l.pid).collect()
    }

    /// Makes `n` VM shells shaped like `cfg`, spread evenly over the workers (all
    /// workers at once), for [`crate::ManagedVm::fork_remote`].
    pub fn shells(&self, cfg: &VmConfig, n: usize) -> Result<RemoteShells, WorkerError> {
        let k = self.links.len().max(1);
        let per: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
        let made: Vec<Result<Vec<RemoteShell>, WorkerError>> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .links
                .iter()
                .zip(&per)
                .map(|(l, &count)| s.spawn(move || Self::shells_on(l, cfg, count)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(WorkerError::Start("a shell thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut shells = Vec::with_capacity(n);
        let mut first_err = None;
        for r in made {
            match r {
                Ok(v) => shells.extend(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // Interleave the workers, so that a fork of fewer clones still spreads.
        shells.sort_by_key(|s| s.order);
        Ok(RemoteShells {
            cfg: cfg.clone(),
            shells: Mutex::new(shells),
            server: self.server.clone(),
        })
    }

    fn shells_on(
        link: &Arc<Link>,
        cfg: &VmConfig,
        count: usize,
    ) -> Result<Vec<RemoteShell>, WorkerError> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let batch = (count - out.len()).min(MAX_FDS);
            let msg = Enc::new(ctl::SHELLS)
                .u32(batch as u32)
                .u64(cfg.mem_bytes)
                .u32(cfg.vcpus)
                .u64(cfg.cpu.map_or(u64::MAX, |c| c as u64))
                .u32(u32::from(cfg.home_node.0));
            let (reply, fds) = link.call(&msg)?;
            let mut d = link.ok(&reply, u32::MAX)?;
            let got = d.u32()? as usize;
            if got != fds.len() {
                return Err(WireError("shell ids and sockets differ").into());
            }
            for fd in fds {
                let id = d.u32()?;
                out.push(RemoteShell {
                    link: link.clone(),
                    id,
                    sock: Some(Seqpacket::from_fd(fd)),
                    order: out.len() as u64,
                    adopted: false,
                });
            }
            if got == 0 {
                return Err(WireError("the worker made no shell").into());
            }
        }
        Ok(out)
    }
}

/// A VM shell in a worker, not yet given memory.
#[derive(Debug)]
struct RemoteShell {
    link: Arc<Link>,
    id: u32,
    sock: Option<Seqpacket>,
    order: u64,
    /// Given to a [`RemoteVm`], which ends the VM instead.
    adopted: bool,
}

impl Drop for RemoteShell {
    fn drop(&mut self) {
        if self.adopted {
            return;
        }
        let _ = self
            .link
            .call_ok(&Enc::new(ctl::DROP).u32(self.id), self.id);
        let _ = self
            .link
            .call_ok(&Enc::new(ctl::FORGET).u32(self.id), self.id);
    }
}

/// Shells made in workers ([`WorkerPool::shells`]).
#[derive(Debug)]
pub struct RemoteShells {
    cfg: VmConfig,
    shells: Mutex<Vec<RemoteShell>>,
    server: Arc<FaultServer>,
}

impl RemoteShells {
    /// Shells ready.
    pub fn len(&self) -> usize {
        self.shells.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shells' shape.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Gives the next shell the address space `make` builds over its host view; the
    /// shell's faults are served from then on.
    pub(crate) fn adopt(
        &self,
        make: impl FnOnce(Arc<dyn HostMmu>) -> Result<Arc<AddressSpace>, FaultError>,
    ) -> Result<Option<RemoteVm>, FaultError> {
        let shell = {
            let mut v = self.shells.lock().unwrap_or_else(|e| e.into_inner());
            if v.is_empty() {
                return Ok(None);
            }
            v.remove(0)
        };
        let mut shell = shell;
        let mmu = Arc::new(RemoteMmu {
            link: shell.link.clone(),
            vm: shell.id,
        });
        let space = make(mmu)?;
        let Some(sock) = shell.sock.take() else {
            space.exit();
            return Err(FaultError::Remote {
                what: "a shell without its fault socket".into(),
                host_limit: false,
            });
        };
        let key = self.server.next_key();
        let conn = FaultConn {
            link: shell.link.clone(),
            vm: shell.id,
            sock,
            serving: Mutex::new(false),
            resolver: SpaceResolver::new(space.clone()),
            key,
        };
        let conn = match self.server.add(conn) {
            Ok(c) => c,
            Err(e) => {
                space.exit();
                return Err(FaultError::Remote {
                    what: format!("serving the clone's faults: {e}"),
                    host_limit: true,
                });
            }
        };
        let link = shell.link.clone();
        let id = shell.id;
        // The VM is the RemoteVm's now: the shell must not drop it.
        shell.adopted = true;
        drop(shell);
        Ok(Some(RemoteVm {
            link,
            id,
            vcpus: self.cfg.vcpus,
            space,
            conn,
            server: self.server.clone(),
        }))
    }
}

/// A VM held by a worker, on memory this process manages (see the module docs).
/// Dropping it ends the VM in its worker, then exits its address space.
#[derive(Debug)]
pub struct RemoteVm {
    link: Arc<Link>,
    id: u32,
    vcpus: u32,
    space: Arc<AddressSpace>,
    conn: Arc<FaultConn>,
    server: Arc<FaultServer>,
}

impl RemoteVm {
    /// Its address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.link.pid
    }

    /// vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Loads saved vCPU states (one per vCPU) into the paused shell; vCPUs with a
    /// command in flight continue it. One message per vCPU: a state with its XSAVE area
    /// is about 5.6 KiB, and a socket message is at most about 200 KiB.
    pub fn restore(&self, states: &[crate::vcpu::VcpuState]) -> Result<(), WorkerError> {
        for (i, s) in states.iter().enumerate() {
            let msg = wire::put_state(Enc::new(ctl::RESTORE).u32(self.id).u32(i as u32), s);
            self.link.call_ok(&msg, self.id)?;
        }
        Ok(())
    }

    /// Starts `cmd` on vCPU `i`.
    pub fn submit(&self, i: u32, cmd: Command) -> Result<(), WorkerError> {
        let msg = wire::put_cmd(Enc::new(ctl::SUBMIT).u32(self.id).u32(i), &cmd);
        self.link.call_ok(&msg, self.id)
    }

    /// Waits for vCPU `i`'s oldest command (at most `timeout`; `None`: until it ends).
    /// A worker answers one wait at a time, so the wait goes in slices of at most
    /// [`WAIT_SLICE`]: a long command of one VM does not hold up its siblings' waits,
    /// and a worker that leaves a slice unanswered is hung (ended, its VMs gone).
    pub fn wait(&self, i: u32, timeout: Option<Duration>) -> Result<CmdResult, WorkerError> {
        let end = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let slice = end.map_or(WAIT_SLICE, |e| {
                e.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
            });
            // Rounded up: a slice cut short would end in 0 ms tries until the deadline.
            let ms = u64::try_from(slice.as_micros().div_ceil(1000)).unwrap_or(u64::MAX - 1);
            let msg = Enc::new(0).u32(self.id).u32(i).u64(ms);
            // The worker answers when the command ends or the slice passes.
            let within = slice.checked_add(self.link.answer_within());
            let (reply, _) = self.link.exchange_within(&self.link.waits, &msg, within)?;
            match self.link.ok(&reply, self.id) {
                // The command is still in flight in the worker: wait on.
                Err(WorkerError::Timeout) if end.is_none_or(|e| Instant::now() < e) => {}
                r => return Ok(wire::get_result(&mut r?)?),
            }
        }
    }

    /// Runs `cmd` on vCPU `i` to completion, however long it takes (use
    /// [`RemoteVm::submit`] and [`RemoteVm::wait`] for a bound).
    pub fn run(&self, i: u32, cmd: Command) -> Result<CmdResult, WorkerError> {
        self.submit(i, cmd)?;
        self.wait(i, None)
    }

    /// Faults the worker resolved for this VM, and why it stopped if it failed.
    pub fn fault_counts(&self) -> Result<(FaultCounts, Option<String>), WorkerError> {
        let (reply, _) = self.link.call(&Enc::new(ctl::COUNTS).u32(self.id))?;
        let mut d = self.link.ok(&reply, self.id)?;
        let c = wire::get_counts(&mut d)?;
        let failed = (d.u8()? != 0).then(|| d.string()).transpose()?;
        Ok((c, failed))
    }

    /// Stops every vCPU without waiting (commands in flight end with an error).
    pub fn stop(&self) {
        let _ = self
            .link
            .call_ok(&Enc::new(ctl::STOP).u32(self.id), self.id);
    }
}

impl Drop for RemoteVm {
    fn drop(&mut self) {
        // The VM stops in its worker (its window stays until revoked), no request of it
        // is served from here on, then the space exits (revoking the window), and the
        // worker lets the window go.
        let _ = self
            .link
            .call_ok(&Enc::new(ctl::DROP).u32(self.id), self.id);
        self.server.close(&self.conn);
        self.space.exit();
        let _ = self
            .link
            .call_ok(&Enc::new(ctl::FORGET).u32(self.id), self.id);
    }
}
