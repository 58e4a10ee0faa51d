//! The global allocator: jemalloc, tuned for a training loop that frees and reallocates the
//! same large activations every step.
//!
//! Two things would otherwise hand those pages back to the kernel, which then faults them back
//! in, zeroed, on the next step (measured: ~220k page faults per bench-dense step, 15 % of the
//! time in the kernel): jemalloc's decay purging, and its way of serving large zeroed requests
//! (candle's `vec![0; n]`) by `madvise(MADV_DONTNEED)` on dirty pages. So purging is off, and
//! zeroed requests are served from dirty pages with a memset.

use std::alloc::{GlobalAlloc, Layout};
use tikv_jemallocator::Jemalloc;

struct TrainingAllocator;

#[global_allocator]
static GLOBAL: TrainingAllocator = TrainingAllocator;

/// Never purge dirty pages; one arena for all sizes.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0\0";

unsafe impl GlobalAlloc for TrainingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Jemalloc.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < (1 << 20) {
            return Jemalloc.alloc_zeroed(layout);
        }
        let p = Jemalloc.alloc(layout);
        if !p.is_null() {
            std::ptr::write_bytes(p, 0, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Jemalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Jemalloc.realloc(ptr, layout, new_size)
    }
}
