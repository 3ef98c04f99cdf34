//! The host kernel as a peer: the same experiments run on ordinary process memory, so
//! that every table can show the manager against what Linux itself does.

use std::time::{Duration, Instant};

/// Anonymous private memory of this process, populated (every page touched).
#[derive(Debug)]
pub struct AnonMemory {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; threads write disjoint pages.
unsafe impl Send for AnonMemory {}
// SAFETY: as above.
unsafe impl Sync for AnonMemory {}

const PAGE: usize = 4096;

impl AnonMemory {
    /// Maps `len` bytes of anonymous memory and writes every page.
    pub fn populated(len: usize) -> std::io::Result<AnonMemory> {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let m = AnonMemory {
            base: p.cast(),
            len,
        };
        m.touch_all(1);
        Ok(m)
    }

    /// Writes one byte in every page (faulting each one that is not yet private).
    pub fn touch_all(&self, value: u8) {
        self.touch_range(0, self.len / PAGE, value);
    }

    /// Writes one byte in pages `first .. first + n`.
    pub fn touch_range(&self, first: usize, n: usize, value: u8) {
        for i in first..first + n {
            // SAFETY: `i < len / PAGE`, so the byte is inside our mapping.
            unsafe { self.base.add(i * PAGE).write_volatile(value) };
        }
    }

    /// Reads one byte in every page; returns their wrapping sum (so the reads happen).
    pub fn read_all(&self) -> u8 {
        (0..self.len / PAGE).fold(0u8, |sum, i| {
            // SAFETY: `i < len / PAGE`, so the byte is inside our mapping.
            sum.wrapping_add(unsafe { self.base.add(i * PAGE).read_volatile() })
        })
    }

    /// Pages in the mapping.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unused after drop.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A forked child process that waits until it is dropped (it holds the parent's pages
/// shared copy-on-write meanwhile).
#[derive(Debug)]
pub struct SleepingChild {
    pid: libc::pid_t,
    /// How long the `fork()` call took in the parent.
    pub fork_time: Duration,
}

impl SleepingChild {
    /// Forks; the child blocks in `pause()` until killed.
    pub fn fork() -> std::io::Result<SleepingChild> {
        let t = Instant::now();
        // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
        let pid = unsafe { libc::fork() };
        let fork_time = t.elapsed();
        match pid {
            -1 => Err(std::io::Error::last_os_error()),
            0 => loop {
                // SAFETY: async-signal-safe; the parent kills us.
                unsafe { libc::pause() };
            },
            pid => Ok(SleepingChild { pid, fork_time }),
        }
    }
}

impl Drop for SleepingChild {
    fn drop(&mut self) {
        // SAFETY: `pid` is our child; reaping it avoids a zombie.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The host's copy-on-write cost: with a forked child sharing `mem`, `threads` threads of
/// this process write one byte in every page (each write a COW fault). Returns the time.
pub fn host_cow(mem: &AnonMemory, threads: usize) -> std::io::Result<Duration> {
    let child = SleepingChild::fork()?;
    let per = mem.pages() / threads;
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || mem.touch_range(k * per, per, 2));
        }
    });
    let d = t.elapsed();
    drop(child);
    Ok(d)
}
