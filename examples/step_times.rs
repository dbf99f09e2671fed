//! Step times of the real model without HTTP or batching logic: load, a 512-token prefill at
//! batch 1, and decode steps at batch 1, 8 and 32 (base, and each row with its own rank-8 q/v
//! adapter), with the LM head. `cargo run --release --example step_times [DTYPE]` (default
//! `auto`); `LORAPLEX_STEPS` sets the decode steps timed per row (default 32).

use candle_core::Device;
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::AdapterMix;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::{BatchInput, Llama, SeqCache, StepLora, WeightFormat};
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_threads();
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let steps: usize = std::env::var("LORAPLEX_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let dev = Device::Cpu;
    let t = Instant::now();
    let m = load_model(DEFAULT_MODEL, WeightFormat::parse(&dtype, &dev)?, &dev)?;
    println!("dtype {dtype} ({}): load {:.2} s, {} MB of weights", m.model.format, t.elapsed().as_secs_f64(), m.model.size_in_bytes() >> 20);
    let model = &m.model;
    let prompt: Vec<u32> = (0..512).map(|i| 100 + (i * 37 % 9000) as u32).collect();
    for _ in 0..2 {
        let mut cache = vec![SeqCache::new(model.cfg.num_layers, 600)];
        let mut refs: Vec<&mut SeqCache> = cache.iter_mut().collect();
        let mut input = BatchInput::default();
        input.push(&prompt);
        let t = Instant::now();
        let h = model.forward(&input, Some(&mut refs), &StepLora::None)?;
        model.logits(&Llama::last_rows(&h, &input.seq_lens)?)?;
        let s = t.elapsed().as_secs_f64();
        println!("prefill 512 at batch 1: {:.1} ms ({:.0} tok/s)", s * 1e3, 512.0 / s);
    }
    let adapters: Vec<AdapterMix> = (0..32)
        .map(|i| Ok(AdapterMix::single(Arc::new(random_adapter(&format!("qv{i}"), &model.cfg, 8, &["q_proj", "v_proj"], i as u64, &dev)?), 1.0)))
        .collect::<anyhow::Result<_>>()?;
    let base = AdapterMix::default();
    // `LORAPLEX_ONLY=32:lora` (or `8:base`, …) times one row only, for profiling.
    let only = std::env::var("LORAPLEX_ONLY").ok();
    for batch in [1usize, 8, 32] {
        for lora_on in [false, true] {
            if only.as_deref().is_some_and(|o| o != format!("{batch}:{}", if lora_on { "lora" } else { "base" })) {
                continue;
            }
            let mixes: Vec<&AdapterMix> = (0..batch).map(|i| if lora_on { &adapters[i] } else { &base }).collect();
            let lora = StepLora::batched(&mixes, model.cfg.num_layers, model.dtype(), &dev)?;
            let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(model.cfg.num_layers, 64 + steps)).collect();
            let mut input = BatchInput::default();
            (0..batch).for_each(|i| input.push(&prompt[i..i + 32]));
            {
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                model.forward(&input, Some(&mut refs), &lora)?;
            }
            let mut step = BatchInput::default();
            (0..batch).for_each(|i| step.push(&[(500 + i) as u32]));
            let t = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
                let h = model.forward(&step, Some(&mut refs), &lora)?;
                model.logits(&h)?;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
            println!("decode batch {batch:>2} {:<24}: {ms:6.2} ms/step, {:7.1} tok/s", if lora_on { "32 distinct r8 q/v" } else { "base" }, batch as f64 * 1e3 / ms);
        }
    }
    Ok(())
}
