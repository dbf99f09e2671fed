//! Process-wide runtime settings that must be fixed before any worker thread starts.

/// Pins `RAYON_NUM_THREADS` when the user has not: candle asks for the thread count on every
/// matmul and, without the variable, re-reads `/proc/cpuinfo` each time (measured: ~10% of a
/// decode step at batch 32). Call first thing in `main`, before any thread exists.
pub fn init_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
