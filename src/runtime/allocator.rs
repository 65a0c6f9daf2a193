//! The C allocator's policy for this process's working pattern: every tract run allocates its
//! activations (tens of MiB) and frees them at the end, hundreds of times per run.
//!
//! glibc serves a block above its mmap threshold with a fresh `mmap` and returns it with
//! `munmap` when freed, and gives the free top of its heaps back to the kernel above its trim
//! threshold. Both thresholds start small (128 KiB) and only adapt after the fact, so each
//! calibration or validation run faulted its activations in again and the kernel zeroed every
//! page (EfficientNet-B0's default run: about a third of its CPU time in page clearing).
//! [`keep_freed_memory`] fixes the mmap threshold at glibc's largest (32 MiB on 64-bit) and
//! raises the trim threshold, so freed activations are reused by the next run. Blocks above
//! 32 MiB (large weights) still go back to the kernel as soon as they are freed, and the
//! process's peak resident memory is unchanged: what is kept is what the previous run had
//! already touched.

/// glibc's largest mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free heap top kept instead of being returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Set the thresholds (see the module docs). Process-wide: the binary calls it once at start;
/// a no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; any value is accepted or refused.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
