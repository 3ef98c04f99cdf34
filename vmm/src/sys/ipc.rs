//! Message sockets between the VMM and its worker processes: `SOCK_SEQPACKET` Unix
//! socket pairs (message boundaries kept, end of file when the peer's last copy closes)
//! that carry bytes and file descriptors (`SCM_RIGHTS`, through vmm-sys-util's
//! [`ScmSocket`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 64;

/// One end of a `SOCK_SEQPACKET` socket pair.
#[derive(Debug)]
pub struct Seqpacket {
    fd: OwnedFd,
}

impl ScmSocket for Seqpacket {
    fn socket_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Seqpacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Seqpacket {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> io::Result<(Seqpacket, Seqpacket)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into `fds` on success.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh fds nothing else owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Seqpacket { fd: a }, Seqpacket { fd: b }))
    }

    /// Wraps `fd`, which must be a `SOCK_SEQPACKET` socket (a worker's inherited end).
    pub fn from_fd(fd: OwnedFd) -> Seqpacket {
        Seqpacket { fd }
    }

    /// The descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message of `bytes` carrying `fds`.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            match self.send_with_fds(&[bytes], &raw) {
                Ok(_) => return Ok(()),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
    }

    /// Receives one message into `buf` (resized to it) and the descriptors it carries
    /// (close-on-exec). `Ok(false)`: the peer closed its end. A message longer than
    /// `buf`'s capacity is an error (`EMSGSIZE`), never silently cut.
    pub fn recv(&self, buf: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
        fds.clear();
        let cap = buf.capacity().max(4096);
        buf.resize(cap, 0);
        let mut raw = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: cap,
        }];
        let (n, nfds) = loop {
            // SAFETY: the iovec points at `buf`'s `cap` initialised bytes, which stay
            // borrowed (and unmoved) for the call.
            match unsafe { self.recv_with_fds(&mut iov, &mut raw) } {
                Ok(r) => break r,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        };
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: F_SETFD on a descriptor we own. Received descriptors are not
            // close-on-exec; a worker spawned later must not inherit them (it would keep
            // the peer's end alive).
            unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            fds.push(owned);
        }
        if n == 0 && nfds == 0 {
            buf.clear();
            return Ok(false);
        }
        if n >= cap {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        buf.truncate(n);
        Ok(true)
    }
}

/// Makes this process ignore SIGINT and SIGTERM (a worker: Ctrl-C in a terminal
/// reaches the whole process group, and the VMM that handles it ends its workers by
/// closing their sockets, after it has stopped their VMs and printed its report).
pub fn ignore_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_whole_and_the_peers_close_is_seen() {
        let (a, b) = Seqpacket::pair().expect("socketpair");
        let (x, _y) = Seqpacket::pair().expect("socketpair");
        a.send(b"hello", &[x.as_fd()]).expect("send");
        let (mut buf, mut fds) = (Vec::with_capacity(64), Vec::new());
        assert!(b.recv(&mut buf, &mut fds).expect("recv"));
        assert_eq!(buf, b"hello");
        assert_eq!(fds.len(), 1);
        drop(a);
        assert!(!b.recv(&mut buf, &mut fds).expect("recv after close"));
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_an_error() {
        let (a, b) = Seqpacket::pair().expect("socketpair");
        a.send(&[7u8; 5000], &[]).expect("send");
        let (mut buf, mut fds) = (Vec::with_capacity(4096), Vec::new());
        let e = b
            .recv(&mut buf, &mut fds)
            .expect_err("must not cut the message");
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }
}
