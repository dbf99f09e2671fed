//! The CPU kernels' thread pool: a few long-lived workers that join the caller on one job at a
//! time, claiming chunks of it from a shared counter.
//!
//! Why not rayon: a call from a thread outside rayon's pool blocks the caller while the pool
//! works, and every call pays a wake-up; a decode step makes ~250 parallel calls of 10–200 µs
//! each. Here the caller always works too, chunks are claimed dynamically (a descheduled worker
//! costs at most the one chunk it holds, never a stall), and workers spin briefly between jobs
//! so the next call of the same step finds them awake; then they park.
//!
//! Protocol (all `SeqCst`, which the two Dekker-style hand-offs below need):
//! - `epoch` is odd while a job is open. The caller writes the job, opens the epoch, works,
//!   closes it (even), then waits until `busy` is zero before the job's borrow ends.
//! - A worker joins by incrementing `busy`, then re-reads `epoch`: only if it is still the same
//!   open epoch does it read the job. Either the caller's close comes after the increment (so
//!   the caller waits for it) or the worker sees the close (so it never touches the job).
//! - A worker about to park increments `sleepers` and re-reads `epoch`; the caller reads
//!   `sleepers` after opening, and unparks when it is non-zero.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks, unless `LORAPLEX_SPIN_US` says otherwise.
/// Long enough to bridge the serial gaps inside a decode step (norms, sampling), short enough
/// not to hold a core between steps.
const DEFAULT_SPIN: Duration = Duration::from_micros(300);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    epoch: AtomicU64,
    next: AtomicUsize,
    n_chunks: AtomicUsize,
    busy: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    /// The open job, with its lifetime erased; valid only while `epoch` is odd and a reader
    /// is counted in `busy` (see the module protocol).
    job: UnsafeCell<Option<*const Job>>,
    spin: Duration,
}

// SAFETY: `job` is written only by the dispatching caller while no worker is registered in
// `busy` for an open epoch (the dispatch mutex serialises callers), and read only by workers
// registered for the open epoch; every other field is atomic.
unsafe impl Sync for Shared {}
// SAFETY: the raw pointer in `job` is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time; a second concurrent caller runs its job inline instead of waiting.
    dispatch: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads()).finish()
    }
}

impl Pool {
    /// A pool that runs jobs on `threads` threads in all (the caller included).
    pub fn new(threads: usize) -> Pool {
        let spin = std::env::var("LORAPLEX_SPIN_US")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(DEFAULT_SPIN, Duration::from_micros);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            n_chunks: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            spin,
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("loraplex-kernel-{i}"))
                    .spawn(move || worker(&s))
                    .ok()
            })
            .collect();
        Pool { shared, workers, dispatch: Mutex::new(()) }
    }

    /// Threads a job runs on (workers plus the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// The size given by `LORAPLEX_THREADS`, else `RAYON_NUM_THREADS`, else the machine's
    /// available parallelism.
    pub fn default_threads() -> usize {
        ["LORAPLEX_THREADS", "RAYON_NUM_THREADS"]
            .iter()
            .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok()))
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `f(0) … f(n_chunks - 1)`, each exactly once, on the caller and the workers; returns
    /// when all have finished. Chunks may run in any order and concurrently.
    pub fn run<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
        if n_chunks == 0 {
            return;
        }
        let guard = match self.dispatch.try_lock() {
            Ok(g) if n_chunks > 1 && !self.workers.is_empty() => g,
            _ => return (0..n_chunks).for_each(f),
        };
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: no worker is registered for an open epoch (the previous call waited for
        // `busy == 0` after closing), so nothing reads `job` while we write it; the pointer
        // is cleared below before `f` goes out of scope, and workers only read it while the
        // epoch we open here is open.
        unsafe {
            let ptr: *const (dyn Fn(usize) + Sync + '_) = job;
            *s.job.get() =
                Some(std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(ptr));
        }
        s.next.store(0, SeqCst);
        s.n_chunks.store(n_chunks, SeqCst);
        let open = s.epoch.load(SeqCst) + 1;
        s.epoch.store(open, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            self.workers.iter().for_each(|w| w.thread().unpark());
        }
        // Closes the epoch and waits out the workers even if `f` panics on this thread, so no
        // worker can call `f` after its borrow ends.
        struct Close<'a>(&'a Shared, u64);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.epoch.store(self.1 + 1, SeqCst);
                wait_idle(self.0);
                // SAFETY: the epoch is closed and no worker is registered, so none can read it.
                unsafe { *self.0.job.get() = None };
            }
        }
        let close = Close(s, open);
        claim_all(s, job);
        drop(close);
        drop(guard);
        if s.panicked.swap(false, SeqCst) {
            panic!("a kernel worker panicked; this is a bug");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

fn claim_all(s: &Shared, job: &(dyn Fn(usize) + Sync + '_)) {
    let n = s.n_chunks.load(SeqCst);
    loop {
        let i = s.next.fetch_add(1, SeqCst);
        if i >= n {
            return;
        }
        job(i);
    }
}

fn wait_idle(s: &Shared) {
    let mut spins = 0u32;
    while s.busy.load(SeqCst) != 0 {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let Some(epoch) = wait_for_job(s, seen) else { return };
        seen = epoch;
        s.busy.fetch_add(1, SeqCst);
        if s.epoch.load(SeqCst) == epoch {
            // SAFETY: registered in `busy` while `epoch` is the open epoch, so the caller has
            // written the job for it and will not return (ending the borrow) until we leave.
            let job = unsafe { *s.job.get() };
            if let Some(job) = job {
                // SAFETY: as above; the pointee outlives this registration.
                let job = unsafe { &*job };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim_all(s, job)))
                    .is_err()
                {
                    s.panicked.store(true, SeqCst);
                    // Let the caller finish: no chunk may be left claimed and unrun forever.
                    s.next.store(usize::MAX / 2, SeqCst);
                }
            }
        }
        s.busy.fetch_sub(1, SeqCst);
    }
}

/// Waits for an open epoch other than `seen`; `None` on shutdown.
fn wait_for_job(s: &Shared, seen: u64) -> Option<u64> {
    let ready = |e: u64| e % 2 == 1 && e != seen;
    let mut start = Instant::now();
    let mut round = 0u32;
    loop {
        if s.shutdown.load(SeqCst) {
            return None;
        }
        let e = s.epoch.load(SeqCst);
        if ready(e) {
            return Some(e);
        }
        round = round.wrapping_add(1);
        if !round.is_multiple_of(64) || start.elapsed() < s.spin {
            std::hint::spin_loop();
            continue;
        }
        s.sleepers.fetch_add(1, SeqCst);
        if !ready(s.epoch.load(SeqCst)) && !s.shutdown.load(SeqCst) {
            std::thread::park();
        }
        s.sleepers.fetch_sub(1, SeqCst);
        start = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_chunk_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
        }
    }

    #[test]
    fn many_short_jobs_and_parked_workers_stay_correct() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.run(4, |i| {
                total.fetch_add(i + 1, SeqCst);
            });
            if round % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2)); // workers park
            }
        }
        assert_eq!(total.load(SeqCst), 2000 * 10);
    }

    #[test]
    fn concurrent_callers_each_get_their_job_done() {
        let pool = Arc::new(Pool::new(2));
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run(5, |i| {
                            sum.fetch_add(i * t, SeqCst);
                        });
                    }
                    sum.load(SeqCst)
                })
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), 200 * 10 * t);
        }
    }
}
