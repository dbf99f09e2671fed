//! DoRA rows against plain LoRA rows of the same rank in one 32-row decode batch of the real
//! model: every row its own rank-8 q/v adapter; arms (all plain, all DoRA — the same `A`, `B`
//! with magnitudes —, and half of each) alternate step by step so a noisy neighbour hits all
//! alike; medians. Also the memory DoRA adds per adapter. `cargo run --release --example
//! dora_throughput [DTYPE] [STEPS]` (default `auto`, 32).

use candle_core::Device;
use loraplex::adapters::synth::random_adapter;
use loraplex::adapters::{AdapterMix, LoraAdapter};
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::lora::DoraRows;
use loraplex::model::{BatchInput, Decoder, ModuleId, SeqCache, StepLora, WeightFormat};
use std::sync::Arc;
use std::time::Instant;

const BATCH: usize = 32;

/// `plain` as a DoRA adapter: magnitudes of `0.8–1.2 ×` each base row's norm.
fn as_dora(plain: &LoraAdapter, model: &Decoder) -> anyhow::Result<LoraAdapter> {
    let base = model.projections();
    let mut modules = Vec::with_capacity(plain.modules.len());
    for (i, m) in plain.modules.iter().enumerate() {
        let Some(w) = m else {
            modules.push(None);
            continue;
        };
        let id = ModuleId::all(model.cfg.num_layers).nth(i).expect("module index in range");
        let weight = base.dense_f32(id)?.expect("an adapted module exists in the base");
        let norms: Vec<f32> = weight.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
        let mag = norms
            .iter()
            .enumerate()
            .map(|(j, n)| n * (0.8 + 0.4 * ((j * 7 % 13) as f32 / 12.0)))
            .collect();
        modules.push(Some(w.clone().with_dora(DoraRows::new(mag, &weight, &w.a, &w.b)?)));
    }
    let size_bytes = modules.iter().flatten().map(|w| w.resident_bytes()).sum();
    Ok(LoraAdapter {
        name: format!("{}-dora", plain.name),
        path: plain.path.clone(),
        rank: plain.rank,
        alpha: plain.alpha,
        modules,
        vocab: Default::default(),
        size_bytes,
        version: 0,
    })
}

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_process();
    let mut args = std::env::args().skip(1);
    let dtype = args.next().unwrap_or_else(|| "auto".into());
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let dev = Device::Cpu;
    let m = load_model(DEFAULT_MODEL, WeightFormat::parse(&dtype, &dev)?, &dev)?;
    let model = &m.model;
    let mut plain = Vec::new();
    let mut dora = Vec::new();
    for i in 0..BATCH {
        let a = random_adapter(
            &format!("qv{i}"),
            &model.cfg,
            8,
            &["q_proj", "v_proj"],
            i as u64,
            &dev,
        )?;
        dora.push(AdapterMix::single(Arc::new(as_dora(&a, model)?), 1.0));
        plain.push(AdapterMix::single(Arc::new(a), 1.0));
    }
    let (p_bytes, d_bytes) =
        (plain[0].entries[0].adapter.size_bytes, dora[0].entries[0].adapter.size_bytes);
    println!(
        "{} ({}): r8 q/v adapter {:.1} KiB resident, as DoRA {:.1} KiB (+{:.1} KiB: per output row the magnitude, three f64 row products and the memo of 4 scales' gains)",
        model.format,
        dtype,
        p_bytes as f64 / 1024.0,
        d_bytes as f64 / 1024.0,
        (d_bytes - p_bytes) as f64 / 1024.0
    );
    let arms: [(&str, Vec<&AdapterMix>); 3] = [
        ("plain", plain.iter().collect()),
        ("dora", dora.iter().collect()),
        ("half", (0..BATCH).map(|i| if i % 2 == 0 { &plain[i] } else { &dora[i] }).collect()),
    ];
    let prompt: Vec<u32> = (0..64).map(|i| 100 + (i * 37 % 9000) as u32).collect();
    let mut runs = Vec::new();
    for (_, mixes) in &arms {
        // The first composition computes the DoRA gains of each scale; later ones (a row
        // admitted or finished) find them in the module's memo.
        let t = Instant::now();
        StepLora::batched(mixes, model.cfg.num_layers, model.dtype(), &dev)?;
        let first_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let lora = StepLora::batched(mixes, model.cfg.num_layers, model.dtype(), &dev)?;
        let compose_ms = (first_ms, t.elapsed().as_secs_f64() * 1e3);
        let mut caches: Vec<SeqCache> =
            (0..BATCH).map(|_| SeqCache::new(model.cfg.num_layers, 64 + steps)).collect();
        let mut input = BatchInput::default();
        (0..BATCH).for_each(|i| input.push(&prompt[i..i + 32]));
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        model.forward(&input, Some(&mut refs), &lora)?;
        runs.push((lora, caches, Vec::with_capacity(steps), compose_ms));
    }
    let mut step = BatchInput::default();
    (0..BATCH).for_each(|i| step.push(&[(500 + i) as u32]));
    for _ in 0..steps {
        for (lora, caches, times, _) in runs.iter_mut() {
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let t = Instant::now();
            let h = model.forward(&step, Some(&mut refs), lora)?;
            model.logits(&h)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut meds = Vec::new();
    for ((name, _), (_, _, times, compose_ms)) in arms.iter().zip(runs.iter_mut()) {
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        meds.push(med);
        println!(
            "decode batch {BATCH}, {name:>5} rows: {med:6.2} ms/step = {:6.1} tok/s (step composition {:.2} ms first, {:.2} ms again)",
            BATCH as f64 * 1e3 / med,
            compose_ms.0,
            compose_ms.1
        );
    }
    println!(
        "DoRA rows at {:.2}× the tokens/s of plain rows; half-and-half at {:.2}×",
        meds[0] / meds[1],
        meds[0] / meds[2]
    );
    Ok(())
}
