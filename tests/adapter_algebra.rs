//! The adapter algebra against Python PEFT's `add_weighted_adapter` (peft 0.22.0,
//! `scripts/peft_merge_reference.py`, outputs in `tests/data/merges`) on the tiny random Llama:
//! every deterministic `combination_type` weight for weight (SVD factors through their product,
//! since a singular pair's sign is arbitrary), the DARE cases in distribution (PEFT's draws come
//! from torch's generator), and the refusals.

mod common;

use actix_web::http::StatusCode;
use common::http::{app, assert_error, call, ctx, post};
use common::shared_dir;
use loraplex::adapters::algebra::{self, AlgebraError, Combination, MergeSpec, SignMethod, Source};
use loraplex::model::load::load_model;
use loraplex::model::{DecoderConfig, WeightFormat};
use nalgebra::DMatrix;
use safetensors::SafeTensors;
use serde_json::json;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Mat = DMatrix<f64>;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/merges")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap()
}

/// The tiny random Llama the reference merges were made on, in f32.
fn tiny_llama_model() -> loraplex::model::load::LoadedModel {
    let dir = shared_dir().join("reference/archs/llama/model");
    load_model(
        dir.to_str().unwrap(),
        WeightFormat::Dense(candle_core::DType::F32),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

fn tiny_llama() -> DecoderConfig {
    tiny_llama_model().model.cfg.clone()
}

fn source_dir(name: &str) -> PathBuf {
    match name {
        "all-r8-b" => data().join("inputs/all-r8-b"),
        other => shared_dir().join("reference/archs/llama/adapters").join(other),
    }
}

fn source(cfg: &DecoderConfig, name: &str) -> Source {
    Source::read(&source_dir(name), name, cfg).unwrap()
}

/// Every `lora_A` / `lora_B` of a PEFT folder, by module path, as f64 matrices.
fn factors(dir: &Path) -> BTreeMap<String, (Mat, Mat)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: BTreeMap<String, (Mat, Mat)> = BTreeMap::new();
    for (key, view) in st.tensors() {
        let values: Vec<f64> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect();
        let m = Mat::from_row_slice(view.shape()[0], view.shape()[1], &values);
        let key = key.strip_prefix("base_model.model.").unwrap();
        let (path, which) = key.rsplit_once(".lora_").unwrap();
        let e = out.entry(path.to_string()).or_insert((Mat::zeros(0, 0), Mat::zeros(0, 0)));
        match which {
            "A.weight" => e.0 = m,
            "B.weight" => e.1 = m,
            other => panic!("unexpected tensor {other}"),
        }
    }
    out
}

/// Ours as the same map.
fn ours(merged: &algebra::Merged) -> BTreeMap<String, (Mat, Mat)> {
    let mat = |t: &candle_core::Tensor| {
        let (r, c) = t.dims2().unwrap();
        let v: Vec<f64> =
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| *x as f64).collect();
        Mat::from_row_slice(r, c, &v)
    };
    merged.modules.iter().map(|(p, a, b)| (p.clone(), (mat(a), mat(b)))).collect()
}

fn spec_of(case: &Value, seed: u64) -> (Vec<String>, MergeSpec) {
    let names = case["adapters"].as_array().unwrap();
    let combination: Combination =
        serde_json::from_value(case["combination_type"].clone()).unwrap();
    let sign: SignMethod = case
        .get("majority_sign_method")
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .unwrap_or_default();
    (
        names.iter().map(|a| a["name"].as_str().unwrap().to_string()).collect(),
        MergeSpec {
            combination,
            weights: names.iter().map(|a| a["weight"].as_f64().unwrap()).collect(),
            svd_rank: case.get("svd_rank").and_then(Value::as_u64).map(|r| r as usize),
            svd_clamp: case.get("svd_clamp").and_then(Value::as_f64),
            density: case.get("density").and_then(Value::as_f64),
            majority_sign_method: sign,
            seed,
        },
    )
}

fn run(cfg: &DecoderConfig, case: &Value, seed: u64) -> algebra::Merged {
    let (names, spec) = spec_of(case, seed);
    let sources: Vec<Source> = names.iter().map(|n| source(cfg, n)).collect();
    algebra::merge(&sources, &spec).unwrap()
}

fn max_abs(m: &Mat) -> f64 {
    m.iter().fold(0.0f64, |a, v| a.max(v.abs()))
}

#[test]
fn every_deterministic_combination_equals_peft() {
    let cfg = tiny_llama();
    let all = cases();
    let mut checked = 0;
    for case in all["cases"].as_array().unwrap().iter().filter(|c| c["random"] == false) {
        let name = case["name"].as_str().unwrap();
        let merged = run(&cfg, case, 0);
        let peft_cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(data().join(name).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(merged.rank as u64, peft_cfg["r"].as_u64().unwrap(), "{name}: r");
        assert_eq!(merged.config.lora_alpha, peft_cfg["lora_alpha"].as_f64().unwrap(), "{name}");
        assert!(!merged.config.use_rslora);
        let theirs = factors(&data().join(name));
        let mine = ours(&merged);
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            mine.keys().collect::<Vec<_>>(),
            "{name}: modules"
        );
        let mut worst = 0.0f64;
        let svd = case["combination_type"].as_str().unwrap().ends_with("svd")
            && name != "single_svd_is_linear";
        for (path, (ta, tb)) in &theirs {
            let (ma, mb) = &mine[path];
            assert_eq!(ta.shape(), ma.shape(), "{name} {path}: A shape");
            assert_eq!(tb.shape(), mb.shape(), "{name} {path}: B shape");
            let want = tb * ta;
            let got = mb * ma;
            let scale = max_abs(&want).max(1e-12);
            let product = max_abs(&(&got - &want)) / scale;
            // `svd_clamp`'s threshold is a quantile of the factors' values, which the signs of
            // the singular pairs move: those are LAPACK's choice in torch and a fixed rule here.
            let tolerance = if name == "svd_clamp" { 0.25 } else { 2e-4 };
            worst = worst.max(product);
            assert!(
                product < tolerance,
                "{name} {path}: B·A differs by {product:e} of its largest value"
            );
            if !svd {
                // Factor by factor: the same numbers PEFT writes.
                let da = max_abs(&(ma - ta)) / max_abs(ta).max(1e-12);
                let db = max_abs(&(mb - tb)) / max_abs(tb).max(1e-12);
                assert!(da < 1e-5 && db < 1e-5, "{name} {path}: A {da:e}, B {db:e}");
            }
        }
        eprintln!("{name}: largest |ΔB·A| / max|B·A| = {worst:.2e}");
        checked += 1;
    }
    assert_eq!(checked, 13);
}

/// The clamp itself, on PEFT's own factors (whose signs torch chose): PEFT's clamped result.
#[test]
fn svd_clamp_equals_peft_given_its_singular_vectors() {
    let unclamped = factors(&data().join("svd_rank4"));
    let clamped = factors(&data().join("svd_clamp"));
    for (path, (a, b)) in &unclamped {
        let (cb, ca) = algebra::clamp(b.clone(), a.clone(), 0.95);
        let (ta, tb) = &clamped[path];
        assert!(max_abs(&(&ca - ta)) < 1e-6 && max_abs(&(&cb - tb)) < 1e-6, "{path}");
    }
}

/// What each element of a factor-wise DARE merge can be: for every subset of the sources that
/// kept it, the value PEFT's formula gives (rescaled by 1/density, TIES's election for
/// `dare_ties`). `Some(subset)` (bit i = source i kept), `None` when several subsets give that
/// value; panics when none does.
fn classify(values: &[f64], weights: &[f64], density: f64, ties: bool, got: f64) -> Option<usize> {
    let n = values.len();
    let sign = |x: f64| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let hits: Vec<usize> = (0..1usize << n)
        .filter(|subset| {
            let p: Vec<f64> = (0..n)
                .map(|i| if subset >> i & 1 == 1 { values[i] / density } else { 0.0 })
                .collect();
            let v = if ties {
                let maj = if p.iter().sum::<f64>() >= 0.0 { 1.0 } else { -1.0 };
                let keep: Vec<usize> = (0..n).filter(|i| sign(p[*i]) == maj).collect();
                keep.iter().map(|i| weights[*i] * p[*i]).sum::<f64>() / (keep.len().max(1) as f64)
            } else {
                (0..n).map(|i| weights[i] * p[i]).sum()
            };
            (v - got).abs() <= 1e-5 * (1.0 + v.abs())
        })
        .collect();
    assert!(!hits.is_empty(), "{got} is no subset's value for inputs {values:?}");
    (hits.len() == 1).then(|| hits[0])
}

/// Shares of the elements of every A and B of a factor-wise DARE merge per kept subset, the
/// last entry the ambiguous ones.
fn subset_shares(
    cfg: &DecoderConfig,
    case: &Value,
    merged: &BTreeMap<String, (Mat, Mat)>,
) -> Vec<f64> {
    let (names, spec) = spec_of(case, 0);
    let sources: Vec<Source> = names.iter().map(|n| source(cfg, n)).collect();
    let inputs: Vec<BTreeMap<String, (Mat, Mat)>> =
        names.iter().map(|n| factors(&source_dir(n))).collect();
    let density = spec.density.unwrap();
    let ties = spec.combination == Combination::DareTies;
    let mut counts = vec![0usize; (1 << names.len()) + 1];
    for (path, (a, b)) in merged {
        let wc: Vec<f64> = sources
            .iter()
            .zip(&spec.weights)
            .map(|(s, w)| {
                let (r, alpha) = s.config.rank_alpha_module(path);
                w * alpha / r as f64
            })
            .collect();
        for (side, got) in [(0, a), (1, b)] {
            let w: Vec<f64> = wc
                .iter()
                .map(|x| if side == 0 { x.signum() * x.abs().sqrt() } else { x.abs().sqrt() })
                .collect();
            for idx in 0..got.len() {
                let values: Vec<f64> = inputs
                    .iter()
                    .map(|m| if side == 0 { m[path].0[idx] } else { m[path].1[idx] })
                    .collect();
                match classify(&values, &w, density, ties, got[idx]) {
                    Some(s) => counts[s] += 1,
                    None => counts[1 << names.len()] += 1,
                }
            }
        }
    }
    let total: usize = counts.iter().sum();
    assert!(total > 1000);
    counts.iter().map(|c| *c as f64 / total as f64).collect()
}

#[test]
fn dare_merges_match_peft_in_distribution() {
    let cfg = tiny_llama();
    let all = cases();
    for name in ["dare_linear", "dare_ties"] {
        let case = all["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        let d = case["density"].as_f64().unwrap();
        let binomial = [(1.0 - d) * (1.0 - d), d * (1.0 - d), d * (1.0 - d), d * d];
        let peft = subset_shares(&cfg, case, &factors(&data().join(name)));
        for seed in [1, 2] {
            let mine = subset_shares(&cfg, case, &ours(&run(&cfg, case, seed)));
            // Thousands of elements: a share's standard error is under 0.01.
            for s in 0..mine.len() {
                assert!(
                    (mine[s] - peft[s]).abs() < 0.03,
                    "{name} seed {seed}: {mine:?} vs PEFT's {peft:?}"
                );
            }
            if name == "dare_linear" {
                for s in 0..4 {
                    assert!(
                        (mine[s] - binomial[s]).abs() < 0.03,
                        "{name}: {mine:?} vs {binomial:?}"
                    );
                }
            }
        }
        // Different seeds draw different masks.
        let a = ours(&run(&cfg, case, 1));
        let b = ours(&run(&cfg, case, 2));
        assert!(a.iter().any(|(p, (x, _))| x != &b[p].0), "{name}: seeds give one mask");
    }
}

#[test]
fn dare_svd_merges_match_peft_in_distribution() {
    let cfg = tiny_llama();
    let all = cases();
    let svd_case = all["cases"].as_array().unwrap().iter().find(|c| c["name"] == "svd").unwrap();
    for name in ["dare_linear_svd", "dare_ties_svd"] {
        let case = all["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        // Against the undropped sum truncated at the same rank: the cosine of the products
        // and the ratio of their norms, ours (two seeds) next to PEFT's.
        let mut plain = svd_case.clone();
        plain["svd_rank"] = case["svd_rank"].clone();
        let reference = ours(&run(&cfg, &plain, 0));
        let stats = |m: &BTreeMap<String, (Mat, Mat)>| {
            let (mut dot, mut nn, mut rr) = (0.0, 0.0, 0.0);
            for (p, (a, b)) in m {
                let x = b * a;
                let y = &reference[p].1 * &reference[p].0;
                dot += x.dot(&y);
                nn += x.norm_squared();
                rr += y.norm_squared();
            }
            (dot / (nn * rr).sqrt(), (nn / rr).sqrt())
        };
        let (pc, pn) = stats(&factors(&data().join(name)));
        for seed in [1, 2] {
            let (c, n) = stats(&ours(&run(&cfg, case, seed)));
            assert!((c - pc).abs() < 0.05, "{name} seed {seed}: cosine {c} vs PEFT's {pc}");
            assert!(
                (n / pn - 1.0).abs() < 0.1,
                "{name} seed {seed}: norm ratio {n} vs PEFT's {pn}"
            );
        }
    }
}

#[test]
fn compression_keeps_the_top_singular_directions() {
    let cfg = tiny_llama();
    let s = source(&cfg, "all-r8");
    let small = algebra::compress(&s, 3).unwrap();
    assert_eq!(small.rank, 3);
    let kept = small.min_energy_kept.unwrap();
    assert!(kept > 0.0 && kept < 1.0, "{kept}");
    let inputs = factors(&source_dir("all-r8"));
    for (path, (a, b)) in ours(&small) {
        let (ia, ib) = &inputs[&path];
        let (r, alpha) = s.config.rank_alpha_module(&path);
        let scaling = alpha / r as f64;
        let full = ib * ia * scaling;
        let svd = full.clone().svd(false, false);
        let mut sv: Vec<f64> = svd.singular_values.iter().copied().collect();
        sv.sort_by(|x, y| y.total_cmp(x));
        // Eckart–Young: the error of the best rank-3 approximation is the tail's energy.
        let err = (&(&b * &a) - &full).norm_squared();
        let tail: f64 = sv.iter().skip(3).map(|x| x * x).sum();
        assert!(
            (err - tail).abs() <= 1e-6 * full.norm_squared().max(1e-12),
            "{path}: {err} vs {tail}"
        );
    }
    assert!(matches!(algebra::compress(&s, 8), Err(AlgebraError::Invalid(_))));
    assert!(matches!(algebra::compress(&s, 0), Err(AlgebraError::Invalid(_))));
}

#[test]
fn incompatible_merges_are_refused_by_name() {
    let cfg = tiny_llama();
    let r8 = source(&cfg, "all-r8");
    let r4 = source(&cfg, "attn-r4");
    let spec = |combination, weights: Vec<f64>| MergeSpec {
        combination,
        weights,
        svd_rank: None,
        svd_clamp: None,
        density: Some(0.5),
        majority_sign_method: SignMethod::Total,
        seed: 0,
    };
    let err = |r: Result<algebra::Merged, AlgebraError>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("merge accepted"),
    };
    // Different ranks and targets for a factor-wise combination.
    let e =
        err(algebra::merge(&[r8.clone(), r4.clone()], &spec(Combination::Ties, vec![1.0, 1.0])));
    assert!(e.contains("one rank") && e.contains("all-r8") && e.contains("attn-r4"), "{e}");
    // Different base models.
    let mut other = r8.clone();
    other.name = "elsewhere".into();
    other.config.base_model_name_or_path = Some("some-org/another-model".into());
    let e = err(algebra::merge(&[r8.clone(), other], &spec(Combination::Cat, vec![1.0, 1.0])));
    assert!(e.contains("different base models") && e.contains("some-org/another-model"), "{e}");
    // Knobs.
    let mut no_density = spec(Combination::DareTies, vec![1.0, 1.0]);
    no_density.density = None;
    assert!(err(algebra::merge(&[r8.clone(), r8.clone()], &no_density)).contains("density"));
    let e = err(algebra::merge(std::slice::from_ref(&r8), &spec(Combination::Cat, vec![1.0, 2.0])));
    assert!(e.contains("weights"), "{e}");
    let e = err(algebra::merge(
        &[r8.clone(), r8.clone()],
        &spec(Combination::Cat, vec![1.0, f64::NAN]),
    ));
    assert!(e.contains("finite"), "{e}");
    let mut big = spec(Combination::Svd, vec![1.0, 1.0]);
    big.svd_rank = Some(65);
    assert!(err(algebra::merge(&[r8.clone(), r4.clone()], &big)).contains("svd_rank"));
}

#[test]
fn dora_adapters_are_refused() {
    let cfg = tiny_llama();
    let dir = tempfile::tempdir().unwrap();
    common::copy_adapter(&source_dir("attn-r4"), dir.path());
    let path = dir.path().join("adapter_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["use_dora"] = true.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let e = Source::read(dir.path(), "d", &cfg).unwrap_err().to_string();
    assert!(e.contains("DoRA") && e.contains("`d`"), "{e}");
}

/// Greedy completion of `body` (`max_tokens` 12, log-probabilities of the chosen tokens).
async fn greedy(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
    mut body: Value,
) -> (String, Vec<f64>) {
    body["prompt"] =
        "Context: The Eiffel Tower is in Paris.\nQuestion: Where is the Eiffel Tower?\nAnswer:"
            .into();
    body["max_tokens"] = 12.into();
    body["temperature"] = 0.into();
    body["logprobs"] = 0.into();
    let (status, v) = call(app, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let lp = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (v["choices"][0]["text"].as_str().unwrap().to_string(), lp)
}

/// On the real model through HTTP: a `cat` merge serves exactly the request-time mix it sums,
/// a compression serves at once, and bad merges are refused by name with nothing served
/// changed.
#[actix_web::test]
async fn merges_and_compressions_serve_at_once_over_http() {
    let c = ctx();
    let app = app(&c).await;
    let mix =
        json!({"adapters": [{"name": "qa-r8", "scale": 0.6}, {"name": "all-r16", "scale": 0.4}]});
    let (mix_text, mix_lp) = greedy(&app, mix).await;
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "qa-cat", "adapters": ["qa-r8", "all-r16"], "weights": [0.6, 0.4],
                   "combination_type": "cat"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "qa-cat");
    assert_eq!(v["rank"], 24);
    assert_eq!(v["created_from"]["combination_type"], "cat");
    let (text, lp) = greedy(&app, json!({"model": "qa-cat"})).await;
    assert_eq!(text, mix_text);
    // The served path quantizes activations to 8 bits per matmul, so a sum taken in another
    // order can round an activation across a step: equal log-probs are the f32 path's
    // (`exact_merges_serve_the_mix_they_sum`); here they agree to that rounding.
    let worst = lp.iter().zip(&mix_lp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(
        worst < 0.25,
        "log-probs of the merge and the mix differ by {worst}: {lp:?} vs {mix_lp:?}"
    );
    // The folder is PEFT's: a config and weights, plus how it was made.
    for f in ["adapter_config.json", "adapter_model.safetensors", "loraplex_merge.json"] {
        assert!(c.dir.path().join("qa-cat").join(f).exists(), "{f}");
    }

    let (status, v) = call(&app, post("/v1/adapters/all-r16/compress", json!({"rank": 4}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "all-r16-r4");
    assert_eq!(v["rank"], 4);
    let kept = v["created_from"]["min_energy_kept"].as_f64().unwrap();
    assert!(kept > 0.0 && kept < 1.0, "{kept}");
    let (base_text, _) = greedy(&app, json!({})).await;
    let (small_text, _) = greedy(&app, json!({"model": "all-r16-r4"})).await;
    assert!(!small_text.is_empty() && !base_text.is_empty());

    // Refusals, by name.
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "x", "adapters": ["qa-r8", "all-r16"],
             "weights": [1, 1], "combination_type": "ties", "density": 0.5}),
        ),
    )
    .await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert_eq!(v["error"]["code"], "incompatible_adapters");
    assert!(v["error"]["message"].as_str().unwrap().contains("one rank"), "{v}");
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "x", "adapters": ["qa-r8", "nope"], "weights": [1, 1]}),
        ),
    )
    .await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "invalid_request_error");
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "qa-cat", "adapters": ["qa-r8"], "weights": [1]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "x", "adapters": ["qa-r8"], "weights": [1],
             "combination_type": "average"}),
        ),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    let (status, v) = call(
        &app,
        post("/v1/adapters/merge", json!({"name": "../x", "adapters": ["qa-r8"], "weights": [1]})),
    )
    .await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    let (status, v) = call(
        &app,
        post(
            "/v1/adapters/merge",
            json!({"name": "x", "adapters": ["qa-r8", "all-r16"],
             "weights": [1, 1], "svd_rank": 100000}),
        ),
    )
    .await;
    assert_error(status, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error");
    assert!(!c.dir.path().join("x").exists());
    // Nothing served changed.
    let (after, after_lp) = greedy(&app, json!({"model": "qa-cat"})).await;
    assert_eq!((after, after_lp), (text, lp));
}

/// A `cat` merge, and an `svd` merge at the full rank, are the request-time mix they sum: the
/// same logits on the f32 path (tiny Llama, both paths of the engine).
#[test]
fn exact_merges_serve_the_mix_they_sum() {
    use loraplex::adapters::{load_adapter, AdapterMix, MixEntry};
    use loraplex::engine::LoraPath;
    use std::sync::Arc;
    let m = tiny_llama_model();
    let cfg = &m.model.cfg;
    let load =
        |d: &Path, n: &str| Arc::new(load_adapter(d, n, cfg, &candle_core::Device::Cpu).unwrap());
    let weights = [0.7, -0.4];
    let mix = AdapterMix::new(
        ["all-r8", "attn-r4"]
            .iter()
            .zip(weights)
            .map(|(n, w)| MixEntry { adapter: load(&source_dir(n), n), scale: w })
            .collect(),
    );
    let sources = [source(cfg, "all-r8"), source(cfg, "attn-r4")];
    let out = tempfile::tempdir().unwrap();
    let prompts = vec![vec![1u32, 5, 9, 33, 70, 2, 8, 400, 100, 20], vec![3, 4, 5]];
    for (combination, svd_rank) in [(Combination::Cat, None), (Combination::Svd, Some(12))] {
        let spec = MergeSpec {
            combination,
            weights: weights.to_vec(),
            svd_rank,
            svd_clamp: None,
            density: None,
            majority_sign_method: SignMethod::Total,
            seed: 0,
        };
        let merged = algebra::merge(&sources, &spec).unwrap();
        let path = out.path().join(combination.name());
        loraplex::adapters::writer::save_modules(&path, &merged.config, &merged.modules, &[])
            .unwrap();
        let single = AdapterMix::single(load(&path, "merged"), 1.0);
        for lora_path in [LoraPath::Batched, LoraPath::PerRow] {
            let want = common::reference::prefill_logits(&m.model, &prompts, &mix, lora_path);
            let got = common::reference::prefill_logits(&m.model, &prompts, &single, lora_path);
            for (w, g) in want.iter().zip(&got) {
                let d = common::max_abs_diff(w, g);
                assert!(d < 1e-4, "{}: {lora_path:?} logits differ by {d}", combination.name());
            }
        }
    }
}
