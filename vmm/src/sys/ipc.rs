//! Message sockets between the VMM and its worker processes: `SOCK_SEQPACKET` Unix
//! socket pairs (message boundaries kept, end of file when the peer's last copy closes)
//! that carry bytes and file descriptors (`SCM_RIGHTS`: sent through vmm-sys-util's
//! [`ScmSocket`], received with `MSG_CMSG_CLOEXEC` so that no other thread's spawn can
//! inherit them), with a deadline on receiving where the caller wants one.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

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
    /// (close-on-exec from the moment they arrive: a worker spawned by another thread
    /// at the same time must not inherit them, it would keep the peer's end alive).
    /// `Ok(false)`: the peer closed its end (a zero-length message, which neither end
    /// ever sends, reads the same). A message longer than `buf`'s capacity is an error
    /// (`EMSGSIZE`), never silently cut; so are descriptors beyond [`MAX_FDS`].
    pub fn recv(&self, buf: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
        self.recv_by(buf, fds, None)
    }

    /// [`Seqpacket::recv`], giving up at `deadline` with [`io::ErrorKind::TimedOut`]
    /// (nothing is read then; a reply that arrives later stays queued).
    pub fn recv_by(
        &self,
        buf: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        deadline: Option<Instant>,
    ) -> io::Result<bool> {
        fds.clear();
        if let Some(d) = deadline {
            self.wait_readable(d)?;
        }
        let cap = buf.capacity().max(4096);
        buf.resize(cap, 0);
        // Room for MAX_FDS descriptors, aligned for cmsghdr.
        let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: cap,
        };
        // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        let n = loop {
            // SAFETY: `mh` points at one iovec over `buf`'s `cap` initialised bytes and
            // at `cmsg`'s bytes, all borrowed (and unmoved) for the call.
            let r = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        };
        // SAFETY: the kernel filled `mh.msg_control` with `msg_controllen` bytes of
        // well-formed control messages; the CMSG_* walk stays inside them.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        // SAFETY: recvmsg gave us this descriptor; nothing else owns it.
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "a message carried more descriptors than allowed",
            ));
        }
        if n == 0 && fds.is_empty() {
            buf.clear();
            return Ok(false);
        }
        if mh.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        buf.truncate(n);
        Ok(true)
    }

    /// Waits until a message (or the peer's close) can be read, at most until `deadline`.
    fn wait_readable(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: poll's milliseconds never end the wait before the deadline.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            match r {
                1.. => return Ok(()),
                0 if Instant::now() < deadline => continue,
                0 => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Shuts both directions down: the peer reads end of file (and this end reads end
    /// of file too) even while other copies of the descriptor exist.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a socket descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
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
    fn received_descriptors_are_close_on_exec() {
        let (a, b) = Seqpacket::pair().expect("socketpair");
        let (x, _y) = Seqpacket::pair().expect("socketpair");
        // Clear close-on-exec on the sent copy: the received one must have it anyway.
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(x.as_fd().as_raw_fd(), libc::F_SETFD, 0) };
        a.send(b"fd", &[x.as_fd()]).expect("send");
        let (mut buf, mut fds) = (Vec::with_capacity(64), Vec::new());
        assert!(b.recv(&mut buf, &mut fds).expect("recv"));
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn a_receive_gives_up_at_its_deadline_and_a_shutdown_reads_as_end_of_file() {
        let (a, b) = Seqpacket::pair().expect("socketpair");
        let (mut buf, mut fds) = (Vec::with_capacity(64), Vec::new());
        let by = Instant::now() + std::time::Duration::from_millis(20);
        let e = b
            .recv_by(&mut buf, &mut fds, Some(by))
            .expect_err("nothing was sent");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now() >= by);
        a.send(b"late", &[]).expect("send");
        assert!(b.recv_by(&mut buf, &mut fds, Some(by)).expect("queued"));
        assert_eq!(buf, b"late");
        b.shutdown();
        assert!(!b.recv(&mut buf, &mut fds).expect("recv after shutdown"));
        assert!(!a.recv(&mut buf, &mut fds).expect("the peer sees it too"));
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

    #[test]
    fn a_message_that_fills_the_buffer_exactly_arrives() {
        let (a, b) = Seqpacket::pair().expect("socketpair");
        let (mut buf, mut fds) = (Vec::with_capacity(4096), Vec::new());
        let cap = buf.capacity().max(4096);
        a.send(&vec![7u8; cap], &[]).expect("send");
        assert!(b.recv(&mut buf, &mut fds).expect("recv"));
        assert_eq!(buf.len(), cap);
    }
}
