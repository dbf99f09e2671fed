//! CPU kernels for the inference path: the packed integer matmul for frozen base weights
#![warn(unsafe_op_in_unsafe_fn)]
//! (GGUF blocks decoded without loss, activations quantized to 8 bits once per matmul,
//! AVX-512 VNNI / AVX-VNNI / AVX2 chosen at run time beside a scalar reference), the fused f32
//! ops a decode step runs between matmuls, the thread pool they share, and the read-bandwidth
//! probe (`probe`) that bounds batch-1 decode.
//!
//! This is the only crate of loraplex with `unsafe` code: SIMD intrinsics behind run-time feature checks,
//! raw output pointers shared by pool chunks that write disjoint ranges, the pool's
//! lifetime-erased job pointer, and the counting global allocator (`alloc`). Each block
//! carries a `// SAFETY:` line.
//!
//! Invariant: every fast kernel equals its reference — bit for bit for the integer matmul,
//! within float tolerance for the fused f32 ops — and a row's result never depends on the
//! other rows of its batch.

/// Defines `fn $name` whose body is compiled for AVX-512, for AVX2 + FMA and for the
/// baseline, and dispatched on the CPU's features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::simd_level() {
                    // SAFETY: the level was detected on this CPU, so its features are present.
                    2 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}

pub mod acts;
pub mod alloc;
pub mod dense;
pub mod fused;
pub mod ggml;
pub mod matmul;
pub mod packed;
pub mod pool;
pub mod probe;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use acts::QuantActs;
pub use packed::{Kind, PackedMatrix};
pub use pool::Pool;

/// The instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit `vpdpbusd` (AVX-512 F + BW + VNNI).
    Avx512Vnni,
    /// 256-bit `vpdpbusd` (AVX-VNNI, with AVX2 and FMA).
    AvxVnni,
    /// AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// The portable reference.
    Scalar,
}

impl Isa {
    /// The fastest this CPU has, unless `LORAPLEX_ISA` (`avx512`, `avxvnni`, `avx2`, `scalar`)
    /// asks for a slower one that it also has.
    pub fn detect() -> Isa {
        let best = Self::available().first().copied().unwrap_or(Isa::Scalar);
        let asked = match std::env::var("LORAPLEX_ISA").ok().as_deref() {
            Some("avx512") => Some(Isa::Avx512Vnni),
            Some("avxvnni") => Some(Isa::AvxVnni),
            Some("avx2") => Some(Isa::Avx2),
            Some("scalar") => Some(Isa::Scalar),
            _ => None,
        };
        match asked {
            Some(a) if a == Isa::Scalar || Self::available().contains(&a) => a,
            _ => best,
        }
    }

    /// Every SIMD variant this CPU can run, fastest first (the scalar reference always can).
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let f = |s: &str| match s {
                "avx512" => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                "avxvnni" => {
                    is_x86_feature_detected!("avxvnni")
                        && is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                _ => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
            };
            if f("avx512") {
                v.push(Isa::Avx512Vnni);
            }
            if f("avxvnni") {
                v.push(Isa::AvxVnni);
            }
            if f("avx2") {
                v.push(Isa::Avx2);
            }
        }
        v
    }

    /// Activation rows one tile takes (what the kernel keeps in registers).
    pub fn tile_rows(self) -> usize {
        match self {
            Isa::Avx512Vnni => 8,
            Isa::AvxVnni | Isa::Avx2 => 4,
            Isa::Scalar => 1,
        }
    }
}

/// What the f32 kernels may use: 2 = AVX-512 (F, BW, VL) with FMA, 1 = AVX2 + FMA, 0 = the
/// baseline; `LORAPLEX_SIMD` (`avx2`, `scalar`) caps it, to measure what a host without
/// AVX-512 gets. Checked per call; the answer is cached.
pub fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("LORAPLEX_SIMD").ok().as_deref() {
            Some("avx2") => 1,
            Some("scalar") => 0,
            _ => 2,
        };
        detected_simd_level().min(cap)
    })
}

fn detected_simd_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if v3
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            return 2;
        }
        if v3 {
            return 1;
        }
    }
    0
}
