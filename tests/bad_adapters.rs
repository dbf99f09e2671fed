//! Broken, hostile and changing adapter folders on a serving instance (real default model):
//! each broken folder is listed in `/v1/adapters` as failed with its error, a request for it
//! gets a clear 4xx, and nothing else stops working; folders still being written load once
//! complete; requests running when their adapter is replaced or deleted finish on the version
//! they started with.

mod common;

use actix_web::http::StatusCode;
use actix_web::test::TestRequest;
use candle_core::{DType, Device, Tensor};
use common::http::{app, call, ctx, post, Ctx};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

fn qa_r8() -> std::path::PathBuf {
    shared_dir().join("adapters/qa-r8")
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(qa_r8().join(WEIGHTS), &Device::Cpu).unwrap()
}

/// A copy of qa-r8 in `root/name` whose weights are `weights` (and config `config`).
fn write(
    root: &Path,
    name: &str,
    config: Option<Value>,
    weights: Option<Vec<u8>>,
) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(c) = config {
        std::fs::write(dir.join(CONFIG), c.to_string()).unwrap();
    }
    if let Some(w) = weights {
        std::fs::write(dir.join(WEIGHTS), w).unwrap();
    }
    dir
}

fn qa_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(qa_r8().join(CONFIG)).unwrap()).unwrap()
}

fn qa_weights() -> Vec<u8> {
    std::fs::read(qa_r8().join(WEIGHTS)).unwrap()
}

fn saved(t: &HashMap<String, Tensor>) -> Vec<u8> {
    let f = tempfile::NamedTempFile::new().unwrap();
    candle_core::safetensors::save(t, f.path()).unwrap();
    std::fs::read(f.path()).unwrap()
}

/// A safetensors file with this header and `data_len` zero bytes of data.
fn with_header(header: &Value, data_len: usize) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(vec![0u8; data_len]);
    out
}

async fn adapters_list(
    app: &impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    >,
) -> HashMap<String, Value> {
    let (s, v) = call(app, TestRequest::get().uri("/v1/adapters")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a.clone()))
        .collect()
}

fn rescan(c: &Ctx) {
    c.state.backend().unwrap().registry.rescan();
}

fn greedy(adapter: &str, tokens: usize) -> Value {
    json!({"prompt": "The history of the city begins", "max_tokens": tokens, "temperature": 0, "ignore_eos": true, "adapters": [{"name": adapter}]})
}

#[actix_web::test]
async fn broken_adapter_folders_are_reported_and_refused_without_harm() {
    let c = ctx();
    let app = app(&c).await;
    let root = c.dir.path();
    let w = qa_weights();
    let mut nan = tensors();
    let key = nan.keys().find(|k| k.contains("lora_B")).unwrap().clone();
    let t = &nan[&key];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::NAN;
    nan.insert(key.clone(), Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
    let ints: HashMap<String, Tensor> =
        tensors().into_iter().map(|(k, t)| (k, t.to_dtype(DType::I64).unwrap())).collect();
    let mut wrong_rank = qa_config();
    wrong_rank["r"] = json!(4);
    let mut qalora = qa_config();
    qalora["use_qalora"] = json!(true);
    // DoRA folders: PEFT's own DoRA adapter, with its magnitudes missing, misshapen or NaN.
    let dora_dir = shared_dir().join("reference/dora/adapters/dora-qv-r8");
    let dora_config: Value =
        serde_json::from_str(&std::fs::read_to_string(dora_dir.join(CONFIG)).unwrap()).unwrap();
    let dora = candle_core::safetensors::load(dora_dir.join(WEIGHTS), &Device::Cpu).unwrap();
    let mag_key = "base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector";
    let mut no_mag = dora.clone();
    no_mag.remove(mag_key).unwrap();
    let mut short_mag = dora.clone();
    short_mag.insert(mag_key.into(), dora[mag_key].narrow(0, 0, 100).unwrap());
    let mut nan_mag = dora.clone();
    let mut v = dora[mag_key].to_vec1::<f32>().unwrap();
    v[7] = f32::NAN;
    nan_mag
        .insert(mag_key.into(), Tensor::from_vec(v, dora[mag_key].shape(), &Device::Cpu).unwrap());
    let outside = tempfile::tempdir().unwrap();
    copy_adapter(&qa_r8(), &outside.path().join("escaped"));
    // (folder, expected fragment of its error)
    let cases: Vec<(&str, &str)> = vec![
        ("truncated", "do not hold"),
        ("corrupt", "header"),
        ("huge-header", "over the"),
        ("huge-tensor", "declares more than"),
        ("offsets-past-end", "do not hold"),
        ("wrong-shapes", "shape"),
        ("wrong-dtype", "dtype"),
        ("nan-weights", "non-finite"),
        ("missing-config", CONFIG),
        ("missing-weights", WEIGHTS),
        ("unsupported-config", "use_qalora"),
        ("dora-no-magnitude", "missing tensor `base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector`"),
        ("dora-short-magnitude", "lora_magnitude_vector` has shape [100]"),
        ("dora-nan-magnitude", "lora_magnitude_vector` has a non-finite value"),
        ("bad-json-config", "adapter_config.json"),
        ("linked-weights", "outside the adapters folder"),
    ];
    write(root, "truncated", Some(qa_config()), Some(w[..w.len() / 2].to_vec()));
    write(
        root,
        "corrupt",
        Some(qa_config()),
        Some((0..4000u32).map(|i| (i * 7919 % 251) as u8).collect()),
    );
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend(b"{}");
    write(root, "huge-header", Some(qa_config()), Some(huge));
    write(
        root,
        "huge-tensor",
        Some(qa_config()),
        Some(with_header(
            &json!({"x": {"dtype": "F32", "shape": [1u64 << 31, 1u64 << 20], "data_offsets": [0, 16]}}),
            16,
        )),
    );
    write(
        root,
        "offsets-past-end",
        Some(qa_config()),
        Some(with_header(
            &json!({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}),
            8,
        )),
    );
    write(root, "wrong-shapes", Some(wrong_rank), Some(w.clone()));
    write(root, "wrong-dtype", Some(qa_config()), Some(saved(&ints)));
    write(root, "nan-weights", Some(qa_config()), Some(saved(&nan)));
    write(root, "missing-config", None, Some(w.clone()));
    write(root, "missing-weights", Some(qa_config()), None);
    write(root, "unsupported-config", Some(qalora), Some(w.clone()));
    write(root, "dora-no-magnitude", Some(dora_config.clone()), Some(saved(&no_mag)));
    write(root, "dora-short-magnitude", Some(dora_config.clone()), Some(saved(&short_mag)));
    write(root, "dora-nan-magnitude", Some(dora_config.clone()), Some(saved(&nan_mag)));
    write(root, "dora-good", Some(dora_config), Some(saved(&dora)));
    let bad_json = write(root, "bad-json-config", None, Some(w.clone()));
    std::fs::write(bad_json.join(CONFIG), "{\"r\": 8,").unwrap();
    let linked = write(root, "linked-weights", Some(qa_config()), None);
    std::os::unix::fs::symlink(outside.path().join("escaped").join(WEIGHTS), linked.join(WEIGHTS))
        .unwrap();
    std::os::unix::fs::symlink(outside.path().join("escaped"), root.join("escaped-folder"))
        .unwrap();
    rescan(&c);

    let list = adapters_list(&app).await;
    for (name, fragment) in &cases {
        let a = list.get(*name).unwrap_or_else(|| panic!("{name} is not listed: {list:?}"));
        assert_eq!(a["state"], "failed", "{name}: {a}");
        let error = a["error"].as_str().unwrap_or_default();
        assert!(
            error.to_lowercase().contains(&fragment.to_lowercase()),
            "{name}: error `{error}` lacks `{fragment}`"
        );
        // A request for it is refused with a clear client error, in OpenAI's shape.
        let (s, v) = call(&app, post("/v1/completions", greedy(name, 2))).await;
        assert!(
            s.is_client_error() && v["error"]["message"].as_str().is_some_and(|m| m.contains(name)),
            "{name}: {s} {v}"
        );
    }
    // The symlinked folder that escapes the root is not an adapter at all.
    assert!(!list.contains_key("escaped-folder"), "{list:?}");
    let (s, _) = call(&app, post("/v1/completions", greedy("escaped-folder", 2))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(list["dora-good"]["dora"], true, "{}", list["dora-good"]);
    assert_eq!(list["qa-r8"]["dora"], false, "{}", list["qa-r8"]);
    // The good adapters still serve.
    for good in ["qa-r8", "all-r16", "rslora-r4", "dora-good"] {
        let (s, v) = call(&app, post("/v1/completions", greedy(good, 4))).await;
        assert_eq!(s, StatusCode::OK, "{good}: {v}");
    }

    // A folder still being written: config first, then half the weights, then all of it.
    let growing = write(root, "growing", Some(qa_config()), None);
    rescan(&c);
    assert_eq!(adapters_list(&app).await["growing"]["state"], "failed");
    std::fs::write(growing.join(WEIGHTS), &w[..w.len() / 3]).unwrap();
    rescan(&c);
    assert_eq!(adapters_list(&app).await["growing"]["state"], "failed");
    std::fs::write(growing.join(WEIGHTS), &w).unwrap();
    rescan(&c);
    let g = &adapters_list(&app).await["growing"];
    assert_eq!(g["state"], "available", "{g}");
    let (s, v) = call(&app, post("/v1/completions", greedy("growing", 8))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, want) = call(&app, post("/v1/completions", greedy("qa-r8", 8))).await;
    assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"], "the completed copy is qa-r8");

    // Fixing a broken folder in place makes it load.
    std::fs::write(root.join("nan-weights").join(WEIGHTS), &w).unwrap();
    rescan(&c);
    let (s, v) = call(&app, post("/v1/completions", greedy("nan-weights", 2))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[actix_web::test]
async fn running_requests_finish_on_the_version_they_started_with() {
    let c = ctx();
    let app = app(&c).await;
    let root = c.dir.path().to_path_buf();
    let tokens = 40;
    // What qa-r8 and all-r16 each produce alone.
    let (_, qa) = call(&app, post("/v1/completions", greedy("qa-r8", tokens))).await;
    let (_, all) = call(&app, post("/v1/completions", greedy("all-r16", tokens))).await;
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_ne!(text(&qa), text(&all));

    // Replaced mid-request (atomic rename of a new version into place).
    copy_adapter(&qa_r8(), &root.join("swapped"));
    rescan(&c);
    let swap = async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(400)).await;
        // Each file renamed over the old one: the folder never disappears.
        copy_adapter(&shared_dir().join("adapters/all-r16"), &root.join(".next"));
        for f in [WEIGHTS, CONFIG] {
            std::fs::rename(root.join(".next").join(f), root.join("swapped").join(f)).unwrap();
        }
        rescan(&c);
    };
    let ((s, during), ()) = futures_util::future::join(
        call(&app, post("/v1/completions", greedy("swapped", tokens))),
        swap,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{during}");
    assert_eq!(text(&during), text(&qa), "the running request kept the version it started with");
    let (_, after) = call(&app, post("/v1/completions", greedy("swapped", tokens))).await;
    assert_eq!(text(&after), text(&all), "a new request gets the new version");
    let version = |v: &Value| v["adapters"][0]["version"].as_u64().unwrap();
    assert!(version(&after) > version(&during), "{during} {after}");

    // Deleted mid-request.
    copy_adapter(&qa_r8(), &root.join("doomed"));
    rescan(&c);
    let delete = async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(400)).await;
        std::fs::remove_dir_all(root.join("doomed")).unwrap();
        rescan(&c);
    };
    let ((s, during), ()) = futures_util::future::join(
        call(&app, post("/v1/completions", greedy("doomed", tokens))),
        delete,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{during}");
    assert_eq!(text(&during), text(&qa));
    let (s, v) = call(&app, post("/v1/completions", greedy("doomed", 2))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}
