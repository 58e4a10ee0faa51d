//! Memory: the global allocator (jemalloc, tuned for a training loop that frees and reallocates
//! the same large activations every step), and fallible allocation bounded by the machine's
//! memory, so that a hostile size is an error instead of an abort.
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

// SAFETY: every method forwards to jemalloc's, which upholds GlobalAlloc's contract; the one
// change (zeroing large blocks by memset) writes only the block just allocated.
unsafe impl GlobalAlloc for TrainingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract passes through unchanged.
        unsafe { Jemalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract passes through unchanged; a non-null `p` points
        // to `layout.size()` writable bytes.
        unsafe {
            if layout.size() < (1 << 20) {
                return Jemalloc.alloc_zeroed(layout);
            }
            let p = Jemalloc.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (that is, jemalloc) with `layout`.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for dealloc; `new_size` is the caller's, under the same contract.
        unsafe { Jemalloc.realloc(ptr, layout, new_size) }
    }
}

/// Physical memory in bytes (Linux), if known.
pub fn memory_bytes() -> Option<u64> {
    static MEM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEM.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Whether `bytes` could be held at all. Beyond the machine's memory counts as "no": with
/// overcommit a huge allocation "succeeds" and the process is later killed by the kernel.
pub fn fits_in_memory(bytes: u64) -> bool {
    memory_bytes().is_none_or(|m| bytes <= m)
}

/// An empty vector with room for exactly `n` elements, or None (not an abort) when that much
/// memory is not to be had.
pub fn reserve_exact<T>(n: usize) -> Option<Vec<T>> {
    let bytes = (n as u64).saturating_mul(std::mem::size_of::<T>() as u64);
    let mut v = Vec::new();
    (fits_in_memory(bytes) && v.try_reserve_exact(n).is_ok()).then_some(v)
}
