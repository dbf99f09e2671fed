//! Step times of the real model without HTTP or batching logic: load, a 512-token prefill at
//! batch 1, and decode steps at batch 1, 8 and 32 (base, and each row with its own rank-8 q/v
//! adapter, alternating step by step with the base so noise hits both; medians), with the LM
//! head. `cargo run --release --example step_times [DTYPE]` (default
//! `auto`); `LORAPLEX_STEPS` sets the decode steps timed per row (default 32), `LORAPLEX_ONLY=32` one
//! batch size, `LORAPLEX_RANK` the adapters' rank. Batch 1 is also reported as a fraction of
//! the host's read bandwidth, measured here with the model's own pool (`kernels::probe`, a
//! 1 GiB buffer streamed by every thread; `LORAPLEX_PROBE_MB` sets its size) after the decode
//! rows (its buffer would otherwise move the allocator's thresholds under them): `bytes per
//! token × tokens/s ÷ bandwidth`.

use candle_core::Device;
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::AdapterMix;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::{BatchInput, Decoder, SeqCache, StepLora, WeightFormat};
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_process();
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let steps: usize =
        std::env::var("LORAPLEX_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let dev = Device::Cpu;
    let t = Instant::now();
    let m = load_model(DEFAULT_MODEL, WeightFormat::parse(&dtype, &dev)?, &dev)?;
    println!(
        "dtype {dtype} ({}): load {:.2} s, {} MB of weights",
        m.model.format,
        t.elapsed().as_secs_f64(),
        m.model.size_in_bytes() >> 20
    );
    let model = &m.model;
    let prompt: Vec<u32> = (0..512).map(|i| 100 + (i * 37 % 9000) as u32).collect();
    for _ in 0..2 {
        let mut cache = [SeqCache::new(model.cfg.num_layers, 600)];
        let mut refs: Vec<&mut SeqCache> = cache.iter_mut().collect();
        let mut input = BatchInput::default();
        input.push(&prompt);
        let t = Instant::now();
        let h = model.forward(&input, Some(&mut refs), &StepLora::None)?;
        model.logits(&Decoder::last_rows(&h, &input.seq_lens)?)?;
        let s = t.elapsed().as_secs_f64();
        println!("prefill 512 at batch 1: {:.1} ms ({:.0} tok/s)", s * 1e3, 512.0 / s);
    }
    let rank: usize = std::env::var("LORAPLEX_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(8);
    let adapters: Vec<AdapterMix> = (0..32)
        .map(|i| {
            Ok(AdapterMix::single(
                Arc::new(random_adapter(
                    &format!("qv{i}"),
                    &model.cfg,
                    rank,
                    &["q_proj", "v_proj"],
                    i as u64,
                    &dev,
                )?),
                1.0,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let base = AdapterMix::default();
    let mut batch1_ms = None;
    // Base and LoRA steps alternate, so a noisy neighbour hits both alike; medians reported.
    // `LORAPLEX_SAME_ADAPTER=1` gives every row the same adapter instead of its own.
    let only: Option<usize> = std::env::var("LORAPLEX_ONLY").ok().and_then(|s| s.parse().ok());
    let same = std::env::var_os("LORAPLEX_SAME_ADAPTER").is_some();
    for batch in [1usize, 8, 32] {
        if only.is_some_and(|o| o != batch) {
            continue;
        }
        let mut runs = Vec::new();
        for lora_on in [false, true] {
            let mixes: Vec<&AdapterMix> = (0..batch)
                .map(|i| if lora_on { &adapters[if same { 0 } else { i }] } else { &base })
                .collect();
            let lora = StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), &dev)?;
            let mut caches: Vec<SeqCache> =
                (0..batch).map(|_| SeqCache::new(model.cfg.num_layers, 64 + steps)).collect();
            let mut input = BatchInput::default();
            (0..batch).for_each(|i| input.push(&prompt[i..i + 32]));
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            model.forward(&input, Some(&mut refs), &lora)?;
            runs.push((lora, caches, Vec::with_capacity(steps)));
        }
        let mut step = BatchInput::default();
        (0..batch).for_each(|i| step.push(&[(500 + i) as u32]));
        for _ in 0..steps {
            for (lora, caches, times) in runs.iter_mut() {
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                let t = Instant::now();
                let h = model.forward(&step, Some(&mut refs), lora)?;
                model.logits(&h)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base_ms = med(&mut runs[0].2);
        let lora_ms = med(&mut runs[1].2);
        println!(
            "decode batch {batch:>2}: base {base_ms:6.2} ms/step ({:6.1} tok/s), {} r{rank} q/v {lora_ms:6.2} ms/step ({:6.1} tok/s), LoRA overhead {:+.1} %",
            batch as f64 * 1e3 / base_ms,
            if same { "1 shared" } else { "distinct" },
            batch as f64 * 1e3 / lora_ms,
            (lora_ms / base_ms - 1.0) * 100.0
        );
        if batch == 1 {
            batch1_ms = Some(base_ms);
        }
    }
    let probe_mb: usize =
        std::env::var("LORAPLEX_PROBE_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let bw = loraplex::kernels::probe::read_bandwidth(&model.kernels.pool, probe_mb << 20, 10);
    let per_token = model.bytes_per_token();
    println!(
        "read bandwidth ({} threads, {} MiB): best {:.2} GB/s, median {:.2} GB/s; batch-1 decode reads {:.1} MB per token, so the bound is {:.0} tok/s",
        bw.threads,
        bw.bytes >> 20,
        bw.best / 1e9,
        bw.median / 1e9,
        per_token as f64 / 1e6,
        bw.median / per_token as f64
    );
    if let Some(ms) = batch1_ms {
        println!(
            "  batch 1 reads {:.2} GB/s = {:.0} % of the probe's median",
            per_token as f64 / ms / 1e6,
            per_token as f64 / (ms * 1e-3) / bw.median * 100.0
        );
    }
    Ok(())
}
