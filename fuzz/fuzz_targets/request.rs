//! cargo-fuzz target `request`: the property is `checks::request` (fuzz/checks.rs), which the
//! regression test tests/fuzz_regressions.rs also replays over fuzz/regressions/request/.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::request(data));
