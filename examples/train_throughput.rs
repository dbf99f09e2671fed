//! Training tokens/s of the issue-31 recipe, the side-by-side of `scripts/bench-peft-train.py`:
//! LoRA r 16 / alpha 32 on q/k/v/o over 4 sequences × 256 tokens of the real model, the loss on
//! the last 8 tokens of each, one optimizer step (forward, backward, clip, AdamW) per batch,
//! the whole batch in one pass. `cargo run --release --example train_throughput [DTYPE]
//! [STEPS]`: DTYPE `f32` (default) or `packed` (the frozen base in the serving kernels' 4-bit
//! layout, QLoRA-style); one warm-up step, then STEPS (default 4) timed one by one, median.

use candle_core::Device;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::WeightFormat;
use loraplex::train::data::TrainExample;
use loraplex::train::run::TrainRun;
use loraplex::train::{TrainConfig, TrainOptions};
use std::time::Instant;

const BATCH: usize = 4;
const SEQ: usize = 256;
const LOSS_TOKENS: usize = 8;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_process();
    loraplex::runtime::training_spin_limit();
    let mut args = std::env::args().skip(1);
    let dtype = args.next().unwrap_or_else(|| "f32".into());
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let dev = Device::Cpu;
    let loaded = load_model(DEFAULT_MODEL, WeightFormat::parse(&dtype, &dev)?, &dev)?;
    let examples: Vec<TrainExample> = (0..BATCH as u32)
        .map(|i| {
            TrainExample::tail(
                (0..(SEQ - 1) as u32).map(|t| 100 + (t * 13 + i * 7) % 4000).collect(),
                (0..LOSS_TOKENS as u32).map(|t| 200 + t + i).collect(),
            )
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let cfg = TrainConfig::try_from(TrainOptions {
        output: Some(dir.path().join("bench")),
        steps: Some(steps + 1),
        batch_size: Some(BATCH),
        micro_batch: Some(0),
        warmup_steps: Some(0),
        checkpoint_every: Some(0),
        max_seq_len: Some(SEQ),
        ..Default::default()
    })?;
    // One run of STEPS + 1 steps, as `loraplex train` and a fine-tuning job run them (the
    // allocator keeps a step's activations for the next one; a run's end gives them back).
    let mut run = TrainRun::new(&loaded.model, examples, &cfg, dir.path().join(".ckpt"))?;
    let mut times = Vec::new();
    for step in 0..=steps {
        let t = Instant::now();
        while run.pass(&loaded.model)?.is_none() {}
        let s = t.elapsed().as_secs_f64();
        println!("step {step}: {s:.2} s, {:.1} tok/s", (BATCH * SEQ) as f64 / s);
        if step > 0 {
            times.push(s);
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "loraplex {dtype}: median {med:.2} s per step = {:.1} tok/s ({} threads)",
        (BATCH * SEQ) as f64 / med,
        loraplex::kernels::Pool::default_threads()
    );
    Ok(())
}
