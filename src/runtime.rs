//! Process-wide runtime settings that must be fixed before any worker thread starts.

/// Call first thing in `main`, before any thread exists. Pins `RAYON_NUM_THREADS` when the
/// user has not: candle asks for the thread count on every matmul and, without the variable,
/// re-reads `/proc/cpuinfo` each time (measured: ~10% of a decode step at batch 32). And
/// keeps freed memory for reuse ([`crate::kernels::alloc::keep_freed_memory`]).
pub fn init_process() {
    crate::kernels::alloc::keep_freed_memory();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Shortens how long candle's element-wise worker spins before it sleeps (unless the user set
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`). Training interleaves element-wise ops with GEMMs that
/// use every core; a worker spinning 25,000 rounds after each element-wise op takes a core
/// from the next GEMM. Measured on the SQuAD recipe (2 cores, same run of 4 steps each):
/// ~139 tok/s at the default, ~167 at 2,000, ~145 at 500. Call before the first tensor op.
pub fn training_spin_limit() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

/// Sends panic reports to the log (one `error` line with the message and place) instead of
/// standard error: a request's panic is caught and answered with a generic 500, and what it
/// said belongs in the log beside the request id, not in a body. Call once the logger is up.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!(panic = %msg, at = %at, %thread, "panicked");
    }));
}
