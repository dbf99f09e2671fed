//! Measures the batcher alone (no HTTP): 32 sequences of a 44-token prompt, 32 tokens each,
//! prefilled together then decoded together. `cargo run --release --example engine_throughput`.

use candle_core::{DType, Device};
use loraplex::engine::{LoraPath, Request};
use loraplex::generate::generate;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::WeightFormat;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_process();
    let m = load_model(DEFAULT_MODEL, WeightFormat::Dense(DType::F32), &Device::Cpu)?;
    let prompt = m.tokenizer.encode(&"The quick brown fox jumps over the lazy dog. ".repeat(4))?;
    for batch in [1usize, 32] {
        let reqs: Vec<Request> = (0..batch)
            .map(|_| Request {
                stop_at_eos: false,
                ..Request::greedy(prompt.clone(), Default::default(), 32)
            })
            .collect();
        let t = Instant::now();
        generate(&m.model, &m.tokenizer, &reqs, LoraPath::Batched)?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "batch {batch}: prompt {} tokens, {:.2} s, {:.1} output tok/s",
            prompt.len(),
            secs,
            (batch * 32) as f64 / secs
        );
    }
    // Prefill alone, then decode steps alone, at batch 32.
    use loraplex::model::{BatchInput, SeqCache, StepLora};
    let mut caches: Vec<SeqCache> = (0..32).map(|_| SeqCache::new(30, 128)).collect();
    let mut input = BatchInput::default();
    (0..32).for_each(|_| input.push(&prompt));
    let t = Instant::now();
    {
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let h = m.model.forward(&input, Some(&mut refs), &StepLora::None)?;
        m.model.logits(&loraplex::model::Decoder::last_rows(&h, &input.seq_lens)?)?;
    }
    println!("prefill 32 x {}: {:.2} s", prompt.len(), t.elapsed().as_secs_f64());
    let mut step = BatchInput::default();
    (0..32).for_each(|_| step.push(&[504]));
    let t = Instant::now();
    for _ in 0..16 {
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let h = m.model.forward(&step, Some(&mut refs), &StepLora::None)?;
        m.model.logits(&h)?;
    }
    println!("decode step at batch 32: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 16.0);
    let logits = m.model.logits(&m.model.forward(&step, None, &StepLora::None)?)?;
    let mut sampler = loraplex::model::sampling::Sampler::new(&Default::default());
    let t = Instant::now();
    for row in 0..32 {
        let l = logits.get(row)?;
        sampler.sample(&l)?;
    }
    println!("argmax sampling of 32 rows: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    let ids: Vec<u32> = (0..40).map(|i| 500 + i).collect();
    let t = Instant::now();
    for _ in 0..32 {
        m.tokenizer.decode(&ids)?;
    }
    println!("decoding 40 ids x 32: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
