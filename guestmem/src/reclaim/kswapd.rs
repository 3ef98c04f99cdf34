//! The background reclaimer (kswapd): one thread per manager that keeps every node's
//! free frames above the low watermark, reclaiming until they reach the high one.
//!
//! Allocations wake it when free frames fall below the low watermark (see
//! [`Manager::kswapd_wake`]); it also looks every 100 ms on its own. Between shrink
//! passes it harvests guest access information from the VMs' host views (see
//! [`Manager::harvest_accesses`]), so that the referenced check sees what KVM guests
//! touched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::space::Manager;

/// How kswapd is woken: a flag and a condition variable.
#[derive(Debug, Default)]
pub struct KswapdWake {
    pending: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl KswapdWake {
    /// Wakes the reclaimer unless a wake is already pending (one futex call per episode
    /// of low memory, not per allocation).
    pub fn wake(&self) {
        // Relaxed: the flag only limits wake-ups; the condition variable orders the rest.
        if !self.pending.swap(true, Ordering::Relaxed) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_one();
        }
    }

    fn wait(&self, timeout: Duration) {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.pending.load(Ordering::Relaxed) {
            let _ = self.cv.wait_timeout(g, timeout);
        }
        self.pending.store(false, Ordering::Relaxed);
    }
}

/// The background reclaimer thread; stops when dropped.
#[derive(Debug)]
pub struct Reclaimer {
    stop: Arc<AtomicBool>,
    mm: Weak<Manager>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaimer {
    /// Starts kswapd for `mm` (which needs swap attached to do anything).
    pub fn start(mm: &Arc<Manager>) -> std::io::Result<Reclaimer> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(mm);
        let thread = std::thread::Builder::new().name("kswapd".into()).spawn({
            let stop = Arc::clone(&stop);
            let weak = weak.clone();
            move || run(&weak, &stop)
        })?;
        Ok(Reclaimer {
            stop,
            mm: weak,
            thread: Some(thread),
        })
    }
}

fn run(weak: &Weak<Manager>, stop: &AtomicBool) {
    // Relaxed: a stop request needs no ordering beyond the wake that follows it.
    while !stop.load(Ordering::Relaxed) {
        let Some(mm) = weak.upgrade() else {
            return;
        };
        mm.background_reclaim();
        let wake = Arc::clone(mm.kswapd());
        drop(mm);
        wake.wait(Duration::from_millis(100));
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mm) = self.mm.upgrade() {
            mm.kswapd().wake();
        }
        if let Some(t) = self.thread.take() {
            // The manager owning this reclaimer may be dropped by the reclaimer's own
            // thread (it held the last reference for a moment): that thread stops by
            // itself at its next look, it cannot be joined from itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
