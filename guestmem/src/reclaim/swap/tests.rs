//! Tests of the swap device.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn dev(slots: u64) -> SwapDevice {
    SwapDevice::create(&SwapConfig {
        slots,
        ..Default::default()
    })
    .unwrap()
}

fn page(v: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| v ^ (i as u8)).collect()
}

#[test]
fn the_file_is_private_preallocated_and_removed_at_drop() {
    let d = dev(256);
    let path = d.path().to_path_buf();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(d.allocated_bytes().unwrap() >= 256 * PAGE_SIZE as u64);
    drop(d);
    assert!(!path.exists());
}

#[test]
fn a_path_that_cannot_be_created_is_refused_with_its_name() {
    let e = SwapDevice::create(&SwapConfig {
        path: Some("/nonexistent/dir/swap".into()),
        slots: 1,
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/swap"), "{e}");
    let d = dev(1);
    let again = SwapDevice::create(&SwapConfig {
        path: Some(d.path().to_path_buf()),
        slots: 1,
        ..Default::default()
    });
    assert!(matches!(again, Err(SwapError::Create { .. })), "O_EXCL");
    assert!(d.path().exists(), "the existing file is left alone");
}

#[test]
fn a_batch_of_consecutive_slots_is_one_write_and_reads_back() {
    for io in [SwapIo::Pwritev, SwapIo::IoUring] {
        let d = SwapDevice::create(&SwapConfig {
            slots: 128,
            io,
            ..Default::default()
        })
        .unwrap();
        // A host with io_uring disabled gets the synchronous fallback.
        let expect = if Ring::new().is_ok() {
            io
        } else {
            SwapIo::Pwritev
        };
        assert_eq!(d.io(), expect);
        batch_round_trip(&d);
    }
}

#[test]
fn batches_in_flight_together_complete_in_any_order() {
    let d = SwapDevice::create(&SwapConfig {
        slots: 256,
        io: SwapIo::IoUring,
        ..Default::default()
    })
    .unwrap();
    let pages: Vec<Vec<u8>> = (0..128).map(|i| page(i as u8)).collect();
    let mut slots = Vec::new();
    assert_eq!(d.alloc(128, &mut slots), 128);
    let batch: Vec<_> = slots
        .iter()
        .zip(&pages)
        .map(|(s, p)| (*s, p.as_ptr()))
        .collect();
    // Two batches, the second waited for first: each collects its own requests.
    // SAFETY: the pages are ours and nobody writes them until both waits are done.
    let (a, b) = unsafe { (d.submit(&batch[..64]), d.submit(&batch[64..])) };
    assert!(b.wait().failed.is_empty());
    assert!(a.wait().failed.is_empty());
    for (s, p) in slots.iter().zip(&pages) {
        let mut buf = vec![0u8; PAGE_SIZE];
        // SAFETY: `buf` is a page we own.
        unsafe { d.read(*s, buf.as_mut_ptr()) }.unwrap();
        assert_eq!(&buf, p);
    }
}

fn batch_round_trip(d: &SwapDevice) {
    let mut slots = Vec::new();
    assert_eq!(d.alloc(64, &mut slots), 64);
    assert!(slots.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{slots:?}");
    let pages: Vec<Vec<u8>> = (0..64).map(|i| page(i as u8)).collect();
    let batch: Vec<_> = slots
        .iter()
        .zip(&pages)
        .map(|(s, p)| (*s, p.as_ptr()))
        .collect();
    // SAFETY: the pages are ours and nobody writes them.
    let out = unsafe { d.write(&batch) };
    assert!(out.failed.is_empty());
    assert_eq!(d.stats().write_calls, 1);
    for (s, p) in slots.iter().zip(&pages) {
        let mut buf = vec![0u8; PAGE_SIZE];
        // SAFETY: `buf` is a page we own (Vec<u8> of PAGE_SIZE; u64 writes only for
        // filled slots, which these are not).
        unsafe { d.read(*s, buf.as_mut_ptr()) }.unwrap();
        assert_eq!(&buf, p);
    }
}

#[test]
fn slots_are_freed_at_their_last_reference_and_reused() {
    let d = dev(4);
    let mut s = Vec::new();
    assert_eq!(d.alloc(8, &mut s), 4, "only four");
    d.dup(s[0], 2);
    assert_eq!(d.put(s[0]), 2);
    assert_eq!(d.put(s[0]), 1);
    assert_eq!(d.put(s[0]), 0);
    assert_eq!(d.stats().used, 3);
    let mut again = Vec::new();
    assert_eq!(d.alloc(1, &mut again), 1);
    assert_eq!(again[0], s[0]);
}

#[test]
fn concurrent_allocations_never_hand_out_a_slot_twice() {
    let d = std::sync::Arc::new(dev(8000));
    let all: Vec<Vec<SwapSlot>> = (0..8)
        .map(|_| {
            let d = std::sync::Arc::clone(&d);
            std::thread::spawn(move || {
                let mut v = Vec::new();
                for _ in 0..125 {
                    d.alloc(8, &mut v);
                }
                v
            })
        })
        .map(|t| t.join().unwrap())
        .collect();
    let mut flat: Vec<_> = all.into_iter().flatten().collect();
    assert_eq!(flat.len(), 8000);
    flat.sort();
    flat.dedup();
    assert_eq!(flat.len(), 8000);
}

#[test]
fn same_filled_slots_read_back_without_io() {
    let d = dev(2);
    let mut s = Vec::new();
    d.alloc(1, &mut s);
    d.store_filled(s[0], 0x0102_0304_0506_0708);
    let mut buf = vec![0u64; PAGE_SIZE / 8];
    // SAFETY: an 8-aligned page we own.
    unsafe { d.read(s[0], buf.as_mut_ptr().cast()) }.unwrap();
    assert!(buf.iter().all(|&w| w == 0x0102_0304_0506_0708));
    assert_eq!(d.stats().bytes_read + d.stats().bytes_written, 0);
    d.put(s[0]);
    assert_eq!(d.stats().filled, 0);
}

#[test]
fn eio_marks_slots_bad_and_enospc_stops_the_device() {
    let d = dev(8);
    let mut s = Vec::new();
    d.alloc(3, &mut s);
    let keep = page(9);
    // SAFETY: our page.
    let first = unsafe { d.write(&[(s[2], keep.as_ptr())]) };
    assert!(first.failed.is_empty());
    d.inject(Some(InjectedFault::Eio { next: 1 }));
    let p = page(1);
    // SAFETY: our page.
    let out = unsafe { d.write(&[(s[0], p.as_ptr())]) };
    assert_eq!(out.failed_slots(), vec![s[0]]);
    assert!(d.is_bad(s[0]) && d.stats().bad == 1);
    d.put(s[0]);
    let mut all = Vec::new();
    d.alloc(8, &mut all);
    assert!(!all.contains(&s[0]), "a bad slot is never handed out again");
    d.inject(Some(InjectedFault::NoSpace));
    // SAFETY: our page.
    let out = unsafe { d.write(&[(s[1], p.as_ptr())]) };
    assert_eq!(out.failed.len(), 1);
    assert!(d.is_stopped() && !d.is_bad(s[1]));
    assert!(d.stop_reason().unwrap().contains("full disk"));
    let mut buf = vec![0u8; PAGE_SIZE];
    // SAFETY: our page.
    unsafe { d.read(s[2], buf.as_mut_ptr()) }.unwrap();
    assert_eq!(buf, keep, "other slots unchanged");
}
