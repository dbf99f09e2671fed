//! The process's global allocator: the system allocator, plus a per-thread tally of bytes
//! allocated minus bytes freed. [`retained`] runs a piece of work and says how many bytes it
//! left allocated: what the grammar cache weighs each compiled grammar by, since llguidance's
//! objects have no size of their own (their memory is 30–120× their grammar's text). And
//! [`keep_freed_memory`]: the system allocator's thresholds, set so freed blocks are reused.
//!
//! The tally is one thread-local add per allocation, and a thread-local without a destructor,
//! so it is reachable from the allocator at any point of a thread's life. Work measured with
//! [`retained`] must run on the calling thread: memory freed by another thread (or memory of
//! another thread freed here) moves the tally of the thread that does the freeing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// glibc's malloc returns large freed blocks to the kernel (each is its own `mmap` below a
/// threshold that starts at 128 KiB, and the heap top is trimmed past 128 KiB), so a training
/// step, whose tensors of 1–10 MB are allocated and freed op after op, took every one as fresh
/// zeroed pages: 13 % of a step in `clear_page` and as much again in page faults. Blocks up to
/// 32 MiB (the largest threshold glibc accepts) now come from the heap, and the free heap top
/// is not trimmed: the training recipe of issue 31 holds ~4 GB of activations for its
/// backward, more than the largest trim threshold `mallopt` takes (an `int`), and a 1 GiB one
/// gave all of it back at the end of every step (12 % of the next step in `clear_page` again).
/// The RSS stays near its peak instead of following every op; [`release_freed_memory`] gives
/// the free memory back when a training run ends. Measured on that recipe (`examples/train_throughput`, 2 threads, AMD EPYC Zen
/// 4): 204.5 tok/s against 166.6 with glibc's defaults. Left alone where the user set glibc's
/// own knobs (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`), and off
/// glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"];
        if user.iter().any(|k| std::env::var_os(k).is_some()) {
            return;
        }
        // SAFETY: `mallopt` only sets allocator parameters; glibc serialises it against
        // concurrent allocation, and both values are inside the ranges it accepts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            // -1: never trim (glibc's documented value).
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
}

/// Gives the allocator's free memory back to the kernel (after a training run, whose
/// activations [`keep_freed_memory`] kept for the next step).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages; glibc locks each arena while it does.
    unsafe {
        libc::malloc_trim(0);
    }
}

thread_local! {
    static NET: Cell<i64> = const { Cell::new(0) };
}

fn add(delta: i64) {
    // `try_with` cannot fail for a const thread-local without a destructor; never panic here.
    let _ = NET.try_with(|n| n.set(n.get().wrapping_add(delta)));
}

/// The system allocator with the per-thread tally.
pub struct Counting;

// SAFETY: every call forwards to `System` with the caller's own arguments, which uphold
// `GlobalAlloc`'s contract; the tally only reads sizes and never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; `calloc` keeps large zeroed buffers lazily mapped.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated minus bytes freed on this thread so far.
pub fn thread_net_bytes() -> i64 {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// Runs `work` and returns its result with the bytes it left allocated on this thread (0 when
/// it freed more than it allocated).
pub fn retained<R>(work: impl FnOnce() -> R) -> (R, usize) {
    let before = thread_net_bytes();
    let out = work();
    let kept = thread_net_bytes().saturating_sub(before).max(0);
    (out, usize::try_from(kept).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::retained;

    #[test]
    fn retained_counts_what_the_work_keeps_not_what_it_frees() {
        let (kept, bytes) = retained(|| {
            let _scratch = vec![0u8; 1 << 20];
            vec![1u64; 1000]
        });
        assert_eq!(kept.len(), 1000);
        assert_eq!(bytes, 8000);
        let (_, freed) = retained(|| drop(kept));
        assert_eq!(freed, 0);
    }
}
