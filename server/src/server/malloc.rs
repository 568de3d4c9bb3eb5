//! Tunes glibc's allocator at startup so that memory a burst of big
//! messages took goes back to the system when the burst is over.
//!
//! glibc serves an allocation of 128 KiB or more with its own `mmap`, and
//! returns it with `munmap` on free, but only until the first such block is
//! freed: then it raises that threshold to the freed block's size (up to
//! 32 MiB) and serves later big blocks from its heaps, which it rarely
//! shrinks. Measured on wshd: a stalled Redis link that queued 64 MiB of
//! 1 MiB messages left the process 35 MiB larger after the queue was gone,
//! and unfinished 1 MiB frames cut by `max_buffered_bytes` left their blocks
//! resident for the next frames. Fixing the threshold (which turns off its
//! dynamic growth) keeps every block of [`MMAP_THRESHOLD`] or more its own
//! mapping, given back the moment it is freed. Messages that big already
//! cost a copy of their size; the `mmap`/`munmap` pair adds little to that.
//!
//! Unsafe is allowed here because `mallopt` is a libc call with no safe
//! wrapper among our dependencies; it takes two integers.
#![allow(unsafe_code)]

/// Blocks at least this big get their own mapping. 256 KiB: above the
/// worker read block (64 KiB) and the small-message paths, below the
/// frames and queues a client or a stalled peer can make us hold.
pub const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Applies the settings above; `false` if the C library refused them (not
/// glibc, or an older one): the server runs the same, with the allocator's
/// own policy.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes allocator settings
        // only; it is thread-safe in glibc.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } == 1;
        // Heap tops above this are trimmed on free (the default follows the
        // dynamic threshold, which is now fixed).
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) } == 1;
        ok && trim
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
