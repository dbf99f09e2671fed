//! cargo-fuzz target `squad`: the property is `checks::squad` (fuzz/checks.rs), which the
//! regression test tests/fuzz_regressions.rs also replays over fuzz/regressions/squad/.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::squad(data));
