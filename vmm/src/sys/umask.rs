//! The process's file-mode creation mask, for files that must never exist with wider
//! permissions than asked for, not even for a moment: a Unix socket's mode is fixed by
//! `bind` from the mask, and `chmod` after `bind` would leave a window in which anyone the
//! default mask lets in could connect.

/// Runs `f` with the file-mode creation mask set to `mask` (e.g. `0o177` for files of
/// mode 0600), then restores the previous mask.
///
/// The mask is process-wide: call this only while no other thread creates files (at
/// start-up, before any thread is spawned), or they get `mask` too.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's creation mask and cannot fail; no memory is
    // passed to the kernel.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let r = f();
    // SAFETY: as above; restores the mask read by the first call.
    unsafe { libc::umask(old) };
    r
}

#[cfg(test)]
mod tests {
    use super::with_umask;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_made_under_mask_0177_has_mode_0600() {
        let dir = std::env::temp_dir().join(format!("vmm-umask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        with_umask(0o177, || std::fs::File::create(&path).map(drop)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
    }
}
