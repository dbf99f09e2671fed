//! Replays the fuzz targets' properties (fuzz/checks.rs) over the committed seed inputs
//! (fuzz/seeds/TARGET/) and every input a fuzzing run found to fail (fuzz/regressions/TARGET/),
//! so each finding stays a regression test without nightly Rust or cargo-fuzz.

#[allow(dead_code)]
mod checks {
    include!("../fuzz/checks.rs");
}

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir).join(target);
        let Ok(rd) = std::fs::read_dir(&folder) else { continue };
        let mut files: Vec<_> =
            rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(result.is_ok(), "{target}: {} fails", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn request_inputs() {
    assert!(replay("request", checks::request) >= 3);
}

#[test]
fn adapter_config_inputs() {
    assert!(replay("adapter_config", checks::adapter_config) >= 4);
}

#[test]
fn safetensors_header_inputs() {
    assert!(replay("safetensors_header", checks::safetensors_header) >= 1);
    // The real adapters' files pass the check and read back.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/adapters");
    for name in ["qa-r8", "all-r16", "rslora-r4"] {
        let bytes = std::fs::read(shared.join(name).join("adapter_model.safetensors")).unwrap();
        assert!(loraplex::adapters::header::check_bytes(&bytes, 1 << 26).is_ok(), "{name}");
        checks::safetensors_header(&bytes);
    }
}

#[test]
fn squad_inputs() {
    assert!(replay("squad", checks::squad) >= 3);
}
