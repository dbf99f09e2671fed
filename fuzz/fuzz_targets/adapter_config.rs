//! cargo-fuzz target `adapter_config`: the property is `checks::adapter_config` (fuzz/checks.rs), which the
//! regression test tests/fuzz_regressions.rs also replays over fuzz/regressions/adapter_config/.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::adapter_config(data));
