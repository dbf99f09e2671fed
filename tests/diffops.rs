//! The fused training kernels (`model::diffops`) against candle's differentiable compositions:
//! same values and same input gradients on random data.

use candle_core::{DType, Device, Tensor, Var, D};
use loraplex::model::diffops;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Value and gradient (of `Σ probe ∘ f(x)`) of both paths.
fn check(
    x: &Tensor,
    fused: impl Fn(&Tensor) -> Tensor,
    reference: impl Fn(&Tensor) -> Tensor,
    tol: f32,
) {
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let probe = rand(y.dims(), 99);
        let loss = (&y * &probe).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(v.as_tensor()).cloned().expect("input got a gradient");
        (y, g)
    };
    let (yf, gf) = run(&fused);
    let (yr, gr) = run(&reference);
    assert_eq!(yf.dims(), yr.dims());
    let (dv, dg) = (max_diff(&yf, &yr), max_diff(&gf, &gr));
    assert!(dv < tol, "values differ by {dv}");
    assert!(dg < tol, "gradients differ by {dg}");
}

#[test]
fn rms_norm_matches_the_composition() {
    let w = rand(&[48], 2);
    check(
        &rand(&[37, 48], 1),
        |x| diffops::rms_norm(x, &w, 1e-5).unwrap(),
        |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap(),
        1e-4,
    );
}

#[test]
fn rope_matches_the_composition() {
    let (n, heads, hd) = (11, 3, 16);
    let angles = (rand(&[n, hd / 2], 3) * 3.0).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    check(
        &rand(&[n, heads, hd], 4),
        |x| diffops::rope(x, &cos, &sin).unwrap(),
        |x| {
            let y = candle_nn::rotary_emb::rope_slow(
                &x.unsqueeze(0).unwrap().transpose(1, 2).unwrap(),
                &cos,
                &sin,
            )
            .unwrap();
            y.transpose(1, 2).unwrap().squeeze(0).unwrap()
        },
        1e-5,
    );
}

/// Scores of 2 KV groups × 3 query heads × `t` queries over `total` keys (`total > t`: the
/// queries continue a cached prefix).
fn causal_case(t: usize, total: usize) {
    let scale = 0.125;
    let reference = |s: &Tensor| {
        let past = total - t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &Device::Cpu).unwrap();
        let s = (s * scale)
            .unwrap()
            .reshape((2, 3, t, total))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((2, 3 * t, total))
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1).unwrap()
    };
    check(
        &(rand(&[2, 3 * t, total], 5) * 10.0).unwrap(),
        |s| diffops::causal_softmax(s, scale, t).unwrap(),
        reference,
        1e-5,
    );
}

#[test]
fn causal_softmax_matches_the_masked_composition() {
    causal_case(9, 9);
    causal_case(4, 13);
    causal_case(1, 6);
}

#[test]
fn causal_softmax_rejects_inconsistent_shapes() {
    let s = Tensor::zeros((2, 7, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(diffops::causal_softmax(&s, 1.0, 3).is_err(), "7 rows are not groups of 3");
    assert!(diffops::causal_softmax(&s, 1.0, 7).is_err(), "7 queries cannot see only 5 keys");
}

#[test]
fn silu_mul_matches_the_composition_for_both_inputs() {
    let up = rand(&[29, 96], 3);
    check(
        &rand(&[29, 96], 4),
        |g| diffops::silu_mul(g, &up).unwrap(),
        |g| (candle_nn::ops::silu(g).unwrap() * &up).unwrap(),
        1e-5,
    );
    let gate = rand(&[29, 96], 5);
    check(
        &rand(&[29, 96], 6),
        |u| diffops::silu_mul(&gate, u).unwrap(),
        |u| (candle_nn::ops::silu(&gate).unwrap() * u).unwrap(),
        1e-5,
    );
}
