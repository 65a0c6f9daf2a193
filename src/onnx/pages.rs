//! Resident pages of memory-mapped input files, released once a payload has been read through.
//!
//! A mapped page a run has read counts in its resident memory until the kernel needs it back.
//! On a large model that is the whole model once more beside tract's own copy of the weights,
//! so the readers that go through a payload once (the non-finite scan, tract's data resolver,
//! decoding a weight to f32) call [`release_pages`] after it:
//!
//! ```text
//! before: RSS = mapping (1x, touched) + tract's tensors (1x)
//! after:  RSS = tract's tensors (1x); the mapping's pages fault back in if read again
//! ```
//!
//! Condition: the bytes lie inside a mapping [`register`]ed by the loader (shared, read-only
//! file mappings); anything else, heap bytes above all, is never advised.

use memmap2::Mmap;
use std::sync::{Arc, Mutex, Weak};

/// Every mapping still alive, so [`release_pages`] can tell a view of one from heap memory.
static LIVE_MAPPINGS: Mutex<Vec<Weak<Mmap>>> = Mutex::new(Vec::new());

/// Remember `map` as a mapping whose pages [`release_pages`] may drop.
pub fn register(map: &Arc<Mmap>) {
    let mut live = LIVE_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|m| m.strong_count() > 0);
    live.push(Arc::downgrade(map));
}

/// Drops this process's resident pages behind `payload` when it is a view of a registered
/// mapping; anything else is left alone. The bytes stay valid: the mapping is shared and
/// read-only, so the next read faults them back in from the page cache unchanged.
pub fn release_pages(payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    let live = LIVE_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    let start = payload.as_ptr() as usize;
    for map in live.iter().filter_map(Weak::upgrade) {
        let base = map.as_ptr() as usize;
        if start >= base && start + payload.len() <= base + map.len() {
            // SAFETY: MADV_DONTNEED on a shared read-only file mapping only drops page-table
            // entries; nothing can observe it but a page fault re-reading the same file bytes
            // (the tool never writes its inputs, see `onnx::load`). A failure is harmless.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start - base,
                    payload.len(),
                )
            };
            return;
        }
    }
}
