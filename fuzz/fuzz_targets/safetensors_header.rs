//! cargo-fuzz target `safetensors_header`: the property is `checks::safetensors_header` (fuzz/checks.rs), which the
//! regression test tests/fuzz_regressions.rs also replays over fuzz/regressions/safetensors_header/.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::safetensors_header(data));
