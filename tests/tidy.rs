//! House rules checked on the source tree: every file opens with a `//!` header saying what it
//! owns, library code has no `unwrap()` or `dbg!` (tests may), `unsafe` stays in the kernels
//! with its justification, the crate map in `src/lib.rs` names every module file, and no lint
//! about too many arguments is silenced (a struct carries them instead).

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_has_a_module_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "tests", "benches", "examples", "crates/loraplex-kernels/src"] {
        rust_files(&root.join(d), &mut files);
    }
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "files without a `//!` header: {missing:?}");
}

#[test]
fn library_code_has_no_unwrap_or_dbg() {
    let mut files = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("crates/loraplex-kernels/src"), &mut files);
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Inline unit tests are test code.
        let lib = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in lib.lines().enumerate() {
            if line.contains(".unwrap()") || line.contains("dbg!(") {
                bad.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(bad.is_empty(), "unwrap()/dbg! in library code: {bad:?}");
}

/// `unsafe` lives only in the kernels crate, and every `unsafe` block there says why it is
/// sound on the lines just above it (`// SAFETY:`), or is inside a function whose safety
/// contract (`# Safety`) it forwards.
#[test]
fn unsafe_is_confined_to_the_kernels_and_justified() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut outside = Vec::new();
    for d in ["src", "tests", "benches", "examples"] {
        rust_files(&root.join(d), &mut outside);
    }
    let leaks: Vec<_> = outside
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.lines().any(|l| {
                !l.trim_start().starts_with("//")
                    && (l.contains("unsafe {")
                        || l.contains("unsafe fn")
                        || l.contains("unsafe impl"))
            })
        })
        .filter(|f| !f.ends_with("tidy.rs"))
        .collect();
    assert!(leaks.is_empty(), "unsafe outside crates/loraplex-kernels: {leaks:?}");
    let mut kernels = Vec::new();
    rust_files(&root.join("crates/loraplex-kernels/src"), &mut kernels);
    let mut unjustified = Vec::new();
    for f in kernels {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if !(code.contains("unsafe {") || code.contains("unsafe impl")) {
                continue;
            }
            // The justification: a `SAFETY:` comment within the 8 lines above.
            let window = &lines[i.saturating_sub(8)..=i];
            if !window.iter().any(|l| l.contains("SAFETY:")) {
                unjustified.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(
        unjustified.is_empty(),
        "unsafe blocks without a `// SAFETY:` line just above: {unjustified:?}"
    );
}

/// The module path of a source file under `src` (`api/handlers.rs` → `api::handlers`,
/// `api/mod.rs` → `api`), or under the kernels crate (`kernels::pool`).
fn module_path(rel: &Path, prefix: &str) -> Option<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop()?;
    match file.as_str() {
        "lib.rs" if parts.is_empty() => return (!prefix.is_empty()).then(|| prefix.to_string()),
        "main.rs" if parts.is_empty() => return Some("main.rs".into()),
        "mod.rs" => {}
        f => parts.push(f.trim_end_matches(".rs").to_string()),
    }
    if !prefix.is_empty() {
        parts.insert(0, prefix.to_string());
    }
    Some(parts.join("::"))
}

#[test]
fn the_crate_map_names_every_module_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let map: String = lib.lines().filter(|l| l.starts_with("//!")).collect::<Vec<_>>().join("\n");
    let mut missing = Vec::new();
    for (dir, prefix) in [("src", ""), ("crates/loraplex-kernels/src", "kernels")] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for f in files {
            let Some(path) = module_path(f.strip_prefix(root.join(dir)).unwrap(), prefix) else {
                continue;
            };
            // Named as `path` or [`path`], not as a prefix of a longer path.
            let named = [format!("`{path}`"), format!("[`{path}`]")]
                .iter()
                .any(|n| map.contains(n.as_str()));
            if !named {
                missing.push(path);
            }
        }
    }
    assert!(missing.is_empty(), "modules the crate map in src/lib.rs does not name: {missing:?}");
}

#[test]
fn no_lint_about_long_argument_lists_is_silenced() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in ["src", "tests", "benches", "examples", "crates/loraplex-kernels/src"] {
        rust_files(&root.join(d), &mut files);
    }
    let lint = ["too_many", "arguments"].join("_");
    let bad: Vec<_> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains(&lint))
        .map(|f| f.display().to_string())
        .collect();
    assert!(bad.is_empty(), "`{lint}` allowed in {bad:?}: pass a struct instead");
}

/// `model` (the base model and LoRA as it computes) never reaches into `adapters` (PEFT files,
/// the registry): the dependency runs one way, from the files to the model.
#[test]
fn the_model_does_not_depend_on_the_adapters_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/model"), &mut files);
    let bad: Vec<_> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().contains("crate::adapters"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(bad.is_empty(), "model files that use `crate::adapters`: {bad:?}");
}

/// The execution mode is an argument, never shared state: no atomic or cell holds it, nothing
/// switches a model's mode, and training asks for the differentiable path by passing it.
#[test]
fn no_shared_execution_mode() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if code.contains("set_exec") || (f.ends_with("ops.rs") && code.contains("Atomic")) {
                found.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(found.is_empty(), "a shared execution mode: {found:?}");
    let trainer = std::fs::read_to_string(root.join("src/train/trainer.rs")).unwrap();
    assert!(trainer.contains("forward_in(Exec::Differentiable"), "training passes its mode");
}

/// Each family is declared once, in `model::family`: no loader or exporter builds an `Arch` by
/// hand, sets a family's facts, or tells families apart by name.
#[test]
fn families_are_declared_once() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let facts = [
        "qk_norm:",
        "norm_plus_one:",
        "sandwich_norms:",
        "embed_scale:",
        "combined_modules:",
        "gguf_qk_interleaved:",
        "activation:",
        "embed_norm:",
        "gated:",
        "position:",
        "naming:",
        ".qk_norm = ",
        ".norm_plus_one = ",
        ".sandwich_norms = ",
        ".embed_scale = ",
        ".combined_modules = ",
        ".gguf_qk_interleaved = ",
        ".activation = ",
    ];
    let names = [
        "\"mistral\"",
        "\"qwen2\"",
        "\"qwen3\"",
        "\"phi3\"",
        "\"gemma3\"",
        "\"gemma3_text\"",
        "\"bloom\"",
    ];
    let mut found = Vec::new();
    for f in [
        "src/model/hf.rs",
        "src/model/gguf.rs",
        "src/model/gguf_export.rs",
        "src/model/names.rs",
        "src/model/load.rs",
    ] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or_default();
            let hit = line.contains("Arch {")
                || facts.iter().any(|k| line.contains(k))
                || names.iter().any(|n| line.contains(n));
            if hit {
                found.push(format!("{f}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "family facts outside model::family:\n{}", found.join("\n"));
}
