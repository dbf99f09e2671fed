//! (f) The frozen-base matmul alone, `x · Wᵀ` for SmolLM2's shapes at batch 1, 8, 32 (and 512,
//! a prefill): the packed integer kernel in each format (from Q4_1 → W4, Q8_0 → W8, Q6_K →
//! W8S16) on every instruction set this CPU has, against candle's dense f32 matmul and
//! candle's `QMatMul` on the same GGUF type. Times include quantizing the activations.
//! Run: `cargo bench --bench base_matmul` (`LORAPLEX_BENCH_SHAPES=576x1536,…` to choose).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loraplex::kernels::ggml::{decode_row, RowCodes};
use loraplex::kernels::matmul::{matmul, quantize};
use loraplex::kernels::{Isa, PackedMatrix, Pool, QuantActs};
use std::time::Duration;

fn shapes() -> Vec<(usize, usize)> {
    let spec =
        std::env::var("LORAPLEX_BENCH_SHAPES").unwrap_or_else(|_| "576x1536,1536x576".into());
    spec.split(',')
        .filter_map(|s| s.split_once('x'))
        .filter_map(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .collect()
}

fn bench(c: &mut Criterion) {
    loraplex::runtime::init_process();
    let dev = Device::Cpu;
    let pool = Pool::new(Pool::default_threads());
    for (k, out) in shapes() {
        let w = Tensor::randn(0f32, 0.05, (out, k), &dev).unwrap();
        let mut g = c.benchmark_group(format!("base_matmul_{k}x{out}"));
        for n in [1usize, 8, 32, 512] {
            g.throughput(Throughput::Elements(n as u64));
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            g.bench_with_input(BenchmarkId::new("candle_f32", n), &n, |b, _| {
                b.iter(|| x.matmul(&w.t().unwrap()).unwrap())
            });
            for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q6K] {
                if k % dt.block_size() != 0 {
                    continue;
                }
                let q = QTensor::quantize(&w, dt).unwrap();
                let data = q.data().unwrap();
                let packed = PackedMatrix::pack(out, k, kind_for(dt), |r, codes: &mut RowCodes| {
                    decode_row(dt, &data, k, r, codes)
                })
                .unwrap();
                let qmm = QMatMul::from_qtensor(q).unwrap();
                g.bench_with_input(
                    BenchmarkId::new(format!("candle_qmatmul_{dt:?}"), n),
                    &n,
                    |b, _| b.iter(|| qmm.forward(&x).unwrap()),
                );
                for isa in Isa::available() {
                    let mut acts = QuantActs::default();
                    let mut y = vec![0f32; n * out];
                    g.bench_with_input(
                        BenchmarkId::new(format!("packed_{:?}_{isa:?}", packed.kind), n),
                        &n,
                        |b, _| {
                            b.iter(|| {
                                quantize(&pool, &xv, n, k, &mut acts);
                                matmul(&pool, isa, &packed, &acts, &mut y);
                            })
                        },
                    );
                }
            }
        }
        g.finish();
    }
}

fn kind_for(dt: GgmlDType) -> loraplex::kernels::Kind {
    use loraplex::kernels::Kind;
    match loraplex::kernels::ggml::code_bits(dt) {
        Some(4) => Kind::W4,
        _ if dt == GgmlDType::Q6K => Kind::W8S16,
        _ => Kind::W8,
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    targets = bench
}
criterion_main!(benches);
