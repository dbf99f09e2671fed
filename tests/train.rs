//! The trainer: SQuAD parsing (v1.1, v2.0, gz, JSONL), prompt and loss mask, truncation that
//! keeps the answer, PEFT output, and on a tiny random model: gradients equal finite
//! differences, the base gets no gradient and never changes, loss goes down, and a resumed run
//! reproduces the uninterrupted one.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::adapters::AdapterMix;
use loraplex::model::tokenizer::TextTokenizer;
use loraplex::model::{Decoder, ModuleId, StepLora};
use loraplex::train::params::LoraParams;
use loraplex::train::squad::{self, Overflow, QaExample, TrainExample};
use loraplex::train::trainer::{batch_loss, train_on};
use loraplex::train::{TrainConfig, TrainOptions};
use std::io::Write;
use std::sync::Arc;

fn tokenizer() -> TextTokenizer {
    let mut f = std::fs::File::open(real_model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

const V11: &str = r#"{"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Paris is the capital of France.",
 "qas": [{"id": "q1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris.", "answer_start": 0}]}]}]}]}"#;
const V20: &str = r#"{"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is the capital of France.",
 "qas": [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": false},
         {"id": "q2", "question": "Moon capital?", "answers": [], "plausible_answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": true}]}]}]}"#;

#[test]
fn squad_v11_v20_gz_and_jsonl_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v11.json");
    std::fs::write(&p, V11).unwrap();
    let ex = squad::load(&p).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].answers, vec!["Paris", "Paris."]);
    assert_eq!(ex[0].answer_start, Some(0));
    let p = dir.path().join("v20.json.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(V20.as_bytes()).unwrap();
    gz.finish().unwrap();
    let ex = squad::load(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert!(ex[1].answers.is_empty(), "unanswerable questions have no answers");
    let p = dir.path().join("x.jsonl");
    std::fs::write(&p, "{\"context\": \"Bern is in Switzerland.\", \"question\": \"Where is Bern?\", \"answer\": \"Switzerland\"}\n\n").unwrap();
    let ex = squad::load(&p).unwrap();
    assert_eq!((ex.len(), ex[0].answer_start), (1, Some(11)));
    let shared = squad::load(&shared_dir().join("data/squad/dev.json")).unwrap();
    assert_eq!(shared.len(), 10570, "the official v1.1 dev set");
    let p = dir.path().join("bad.json");
    std::fs::write(&p, "{\"data\": 3}").unwrap();
    assert!(squad::load(&p).unwrap_err().to_string().contains("bad.json"));
}

#[test]
fn prompt_and_loss_mask_cover_the_answer_and_eos_only() {
    let tok = tokenizer();
    let ex = QaExample {
        id: "q".into(),
        context: "Paris is the capital of France.".into(),
        question: "What is the capital of France?".into(),
        answers: vec!["Paris".into()],
        answer_start: Some(0),
    };
    assert_eq!(squad::prompt(&ex), "### CONTEXT\nParis is the capital of France.\n\n### QUESTION\nWhat is the capital of France?\n\n### ANSWER\n");
    let t = squad::tokenize(&ex, &tok, 384, Overflow::Skip).unwrap().unwrap();
    let prompt_ids = tok.encode(&squad::prompt(&ex)).unwrap();
    let answer_ids = tok.encode("Paris").unwrap();
    let mut full = prompt_ids.clone();
    full.extend(&answer_ids);
    full.push(2);
    assert_eq!(
        t.targets,
        [answer_ids.clone(), vec![2]].concat(),
        "targets: the answer then <|im_end|>"
    );
    assert_eq!(
        t.input,
        full[..full.len() - 1].to_vec(),
        "input: prompt + answer, without the final EOS"
    );
    let mask = t.loss_mask();
    let supervised: Vec<usize> =
        mask.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i).collect();
    assert_eq!(
        supervised,
        (prompt_ids.len() - 1..t.input.len()).collect::<Vec<_>>(),
        "only the answer and EOS carry loss"
    );
    assert_eq!(mask[prompt_ids.len() - 1], Some(answer_ids[0]));
}

#[test]
fn long_examples_are_skipped_or_truncated_around_the_answer() {
    let tok = tokenizer();
    let filler = "The river flows quietly through the old valley. ".repeat(40);
    let context = format!("{filler}The treasure was hidden under the red bridge in 1642. {filler}");
    let start = context.find("the red bridge").unwrap();
    let ex = QaExample {
        id: "q".into(),
        context: context.clone(),
        question: "Where was the treasure hidden?".into(),
        answers: vec!["under the red bridge".into()],
        answer_start: Some(context[..start - 6].chars().count()),
    };
    assert!(squad::tokenize(&ex, &tok, 128, Overflow::Skip).unwrap().is_none());
    let t = squad::tokenize(&ex, &tok, 128, Overflow::Truncate).unwrap().unwrap();
    assert!(t.full_len() <= 128, "{}", t.full_len());
    let text = tok.decode(&t.input).unwrap();
    assert!(
        text.contains("under the red bridge in 1642"),
        "the answer stays in the context: {text}"
    );
    assert!(
        text.starts_with("### CONTEXT\n")
            && text.contains("### QUESTION\nWhere was the treasure hidden?")
    );
}

fn tiny_examples() -> Vec<TrainExample> {
    (0..6u32)
        .map(|i| {
            TrainExample::tail(
                (0..10 + i).map(|t| (t * 7 + i) % 60 + 3).collect(),
                vec![(i * 5) % 60 + 2, 11, 1],
            )
        })
        .collect()
}

fn tiny_config(dir: &std::path::Path, steps: usize) -> TrainConfig {
    TrainConfig::try_from(TrainOptions {
        output: Some(dir.join("tiny-adapter")),
        rank: Some(4),
        alpha: Some(8.0),
        dropout: Some(0.1),
        target_modules: Some(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
        steps: Some(steps),
        batch_size: Some(3),
        grad_accum: Some(2),
        lr: Some(1e-2),
        warmup_steps: Some(2),
        max_seq_len: Some(64),
        checkpoint_every: Some(0),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn gradients_match_finite_differences_and_the_base_gets_none() {
    let (model, cfg) = tiny();
    let peft = loraplex::adapters::PeftConfig::from_json(
        &lora_config(2, 4.0, &["q_proj", "up_proj"]).to_string(),
    )
    .unwrap();
    let params = LoraParams::init(&cfg, peft, 3, &Device::Cpu).unwrap();
    // B starts at zero (so A's gradient is zero); give it values to test both.
    for (_, _, b) in &params.modules {
        b.set(&Tensor::randn(0f32, 0.3, b.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let adapter = Arc::new(params.as_adapter(&cfg, "t").unwrap());
    let ex = tiny_examples();
    let batch: Vec<&TrainExample> = ex.iter().take(3).collect();
    let lora = StepLora::Training {
        mixes: vec![AdapterMix::single(adapter, 1.0); 3],
        dropout: 0.0,
        seed: 0,
    };
    let loss_of =
        || batch_loss(&model, &lora, &batch).unwrap().0.to_scalar::<f32>().unwrap() as f64;
    let (loss, _) = batch_loss(&model, &lora, &batch).unwrap();
    let grads = loss.backward().unwrap();
    let q = ModuleId { layer: 1, target: loraplex::model::Target::Q };
    assert!(grads.get(model.base_weight(q).unwrap().to_dense_f32().as_ref().unwrap()).is_none());
    let before = model
        .base_weight(q)
        .unwrap()
        .to_dense_f32()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut checked = 0;
    for (path, a, b) in params.modules.iter().take(3) {
        for var in [a, b] {
            assert_grad_matches(var, &grads, loss_of, path);
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
    let after = model
        .base_weight(q)
        .unwrap()
        .to_dense_f32()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after, "the base never changes");
}

#[test]
fn a_few_steps_drive_the_loss_down_and_leave_the_base_unchanged() {
    let (model, _) = tiny();
    let base_before = model
        .base_weight(ModuleId { layer: 0, target: loraplex::model::Target::Down })
        .unwrap()
        .to_dense_f32()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir.path(), 30);
    cfg.dropout = 0.0;
    cfg.lr = 3e-2;
    let ex: Vec<TrainExample> = tiny_examples().into_iter().take(3).collect();
    cfg.batch_size = 3;
    cfg.grad_accum = 1;
    let o = train_on(&model, &ex, &cfg, false, None).unwrap();
    let first = o.log.first().unwrap().loss;
    let last = o.log.last().unwrap().loss;
    assert!(last < 0.5 * first, "loss {first} → {last}");
    let base_after = model
        .base_weight(ModuleId { layer: 0, target: loraplex::model::Target::Down })
        .unwrap()
        .to_dense_f32()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(base_before, base_after);
}

#[test]
fn splitting_a_batch_into_passes_keeps_the_update() {
    // Without dropout, passes of 1 or 2 examples give the whole batch's mean-loss gradient.
    let ex = tiny_examples();
    let run = |micro: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(dir.path(), 3);
        cfg.dropout = 0.0;
        cfg.micro_batch = micro;
        let (model, _) = tiny();
        train_on(&model, &ex, &cfg, false, None).unwrap()
    };
    let whole = run(0);
    for micro in [1, 2] {
        let split = run(micro);
        for (w, s) in whole.log.iter().zip(&split.log) {
            assert!(
                (w.loss - s.loss).abs() < 1e-5 && (w.grad_norm - s.grad_norm).abs() < 1e-4,
                "step {}: {w:?} vs {s:?}",
                w.step
            );
        }
        for ((_, a1, b1), (_, a2, b2)) in whole.params.modules.iter().zip(&split.params.modules) {
            assert!(max_abs_diff(a1.as_tensor(), a2.as_tensor()) < 1e-5);
            assert!(max_abs_diff(b1.as_tensor(), b2.as_tensor()) < 1e-5);
        }
    }
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_adapter() {
    let ex = tiny_examples();
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny();
    let full = train_on(&model, &ex, &tiny_config(dir.path(), 8), false, None).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(dir2.path(), 8);
    cfg.stop_after = Some(3);
    let (model2, _) = tiny();
    let part = train_on(&model2, &ex, &cfg, false, None).unwrap();
    assert!(!part.finished && part.log.len() == 3);
    cfg.stop_after = None;
    cfg.resume = true;
    let (model3, _) = tiny();
    let resumed = train_on(&model3, &ex, &cfg, false, None).unwrap();
    assert!(resumed.finished && resumed.log.len() == 8);
    for ((_, a1, b1), (_, a2, b2)) in full.params.modules.iter().zip(&resumed.params.modules) {
        assert!(max_abs_diff(a1.as_tensor(), a2.as_tensor()) < 1e-6);
        assert!(max_abs_diff(b1.as_tensor(), b2.as_tensor()) < 1e-6);
    }
}

#[test]
fn the_output_is_a_peft_folder_that_loads() {
    let (model, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let tc = tiny_config(dir.path(), 2);
    let o = train_on(&model, &tiny_examples(), &tc, false, None).unwrap();
    let weights = o.params.export().unwrap();
    let out = dir.path().join("peft");
    loraplex::adapters::writer::save_modules(&out, &o.params.config, &weights, &[]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    for field in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "target_modules",
        "use_rslora",
        "lora_dropout",
        "bias",
        "base_model_name_or_path",
        "fan_in_fan_out",
        "use_dora",
        "modules_to_save",
    ] {
        assert!(json.get(field).is_some(), "missing `{field}`");
    }
    assert_eq!(
        (json["peft_type"].as_str(), json["r"].as_u64(), json["bias"].as_str()),
        (Some("LORA"), Some(4), Some("none"))
    );
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(st.len(), 2 * 3 * cfg.num_layers);
    let loaded = loraplex::adapters::load_adapter(&out, "peft", &cfg, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.module(ModuleId { layer: 0, target: loraplex::model::Target::V }).unwrap().scaling,
        2.0
    );
    let _ = Decoder::random;
}

#[test]
fn jsonl_answer_offsets_count_characters_not_bytes() {
    // `answer_start` is a character offset (as in SQuAD JSON); a JSONL line derives it from
    // the context, where "ü" takes two bytes but one character.
    let text =
        r#"{"context": "Zürich liegt am Zürichsee.", "question": "Woran?", "answer": "Zürichsee"}"#;
    let ex = loraplex::train::squad::parse(text, true).unwrap();
    assert_eq!(ex[0].answer_start, Some(16));
    let start: String = ex[0].context.chars().skip(16).take(9).collect();
    assert_eq!(start, "Zürichsee");
}

/// DoRA's trainable tensors (A, B and the magnitude) get the gradients of PEFT's DoRA, whose
/// weight norm is detached: central differences with the norms held at the step's values,
/// without dropout and with it (where PEFT rescales the base product of the dropped input).
#[test]
fn dora_gradients_match_finite_differences() {
    let (model, cfg) = tiny();
    let mut json = lora_config(2, 4.0, &["q_proj", "up_proj"]);
    json["use_dora"] = true.into();
    let peft = loraplex::adapters::PeftConfig::from_json(&json.to_string()).unwrap();
    let base = model.projections();
    let params = LoraParams::init_on(&cfg, peft, 3, &Device::Cpu, Some(&base)).unwrap();
    for (_, _, b) in &params.modules {
        b.set(&Tensor::randn(0f32, 0.3, b.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    for m in params.magnitudes.iter().flatten() {
        let bump = Tensor::randn(0f32, 0.2, m.shape(), &Device::Cpu).unwrap();
        m.set(&(m.as_tensor() + bump).unwrap()).unwrap();
    }
    let adapter = Arc::new(params.as_adapter(&cfg, "t").unwrap());
    let ex = tiny_examples();
    let batch: Vec<&TrainExample> = ex.iter().take(3).collect();
    for dropout in [0.0, 0.2] {
        let lora = StepLora::Training {
            mixes: vec![AdapterMix::single(adapter.clone(), 1.0); 3],
            dropout,
            seed: 5,
        };
        let loss_of =
            || batch_loss(&model, &lora, &batch).unwrap().0.to_scalar::<f32>().unwrap() as f64;
        let (loss, _) = batch_loss(&model, &lora, &batch).unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for ((path, a, b), m) in params.modules.iter().zip(&params.magnitudes).take(3) {
            for var in [a, b, m.as_ref().unwrap()] {
                assert_grad_matches(var, &grads, loss_of, &format!("{path} (dropout {dropout})"));
                checked += 1;
            }
        }
        assert_eq!(checked, 9);
    }
}

/// `use_dora` training end to end on the tiny model: the loss falls, the folder is a PEFT
/// DoRA adapter (config and `lora_magnitude_vector` tensors, magnitudes moved from their
/// `||W||` start), and it serves with the training forward's own outputs.
#[test]
fn dora_training_writes_a_servable_dora_adapter() {
    let (model, cfg) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut tc = tiny_config(dir.path(), 12);
    tc.use_dora = true;
    tc.lr = 3e-2;
    tc.batch_size = 3;
    tc.grad_accum = 1;
    let ex: Vec<TrainExample> = tiny_examples().into_iter().take(3).collect();
    let o = train_on(&model, &ex, &tc, false, None).unwrap();
    let (first, last) = (o.log.first().unwrap().loss, o.log.last().unwrap().loss);
    assert!(last < first, "loss {first} → {last}");
    let out = &tc.output;
    let p = &o.params;
    loraplex::adapters::writer::save_dora_modules(
        out,
        &p.config,
        &p.export().unwrap(),
        &p.export_magnitudes().unwrap(),
        &[],
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["use_dora"], true);
    let tensors =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let q0 = ModuleId { layer: 0, target: loraplex::model::Target::Q };
    let mag = &tensors[&format!("base_model.model.{q0}.lora_magnitude_vector")];
    let w = model.base_weight(q0).unwrap().to_dense_f32().unwrap();
    let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    assert!(max_abs_diff(mag, &norms) > 1e-4, "the magnitudes trained");
    let base = model.projections();
    let served = Arc::new(
        loraplex::adapters::load_adapter_on(out, "d", &cfg, &Device::Cpu, Some(&base)).unwrap(),
    );
    let mix = AdapterMix::single(served, 1.0);
    let mut input = loraplex::model::BatchInput::default();
    input.push(&ex[0].input);
    let lora = |m: &AdapterMix, batched: bool| match batched {
        true => StepLora::batched(&[m], cfg.num_layers, model.dtype(), &Device::Cpu).unwrap(),
        false => StepLora::Training { mixes: vec![m.clone()], dropout: 0.0, seed: 0 },
    };
    let fast = model.forward(&input, None, &lora(&mix, true)).unwrap();
    let train = model
        .forward_in(loraplex::model::Exec::Differentiable, &input, None, &lora(&mix, false))
        .unwrap();
    let plain = model.forward(&input, None, &StepLora::None).unwrap();
    assert!(max_abs_diff(&fast, &train) < 1e-4, "{}", max_abs_diff(&fast, &train));
    assert!(max_abs_diff(&fast, &plain) > 1e-3);
}
