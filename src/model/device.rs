//! Parsing of `--device` and `--dtype`, and the per-device default weight format.

use super::{ModelError, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

/// `cpu`, `cuda`, `cuda:N` or `metal` → a candle device. CUDA and Metal need the crate built
/// with the matching cargo feature; without it candle answers with a clear error.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let dev = match spec.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => new_cuda(n)?,
            _ => return Err(ModelError::Device(spec)),
        },
    };
    Ok(dev)
}

/// CUDA device `n`, or an error that names CUDA. A driver without a usable GPU (or the link
/// stubs of `scripts/build-cuda.sh`, on a machine without a driver) fails `cuInit`, which comes
/// back as an error. Some failures inside candle's CUDA layer panic instead of answering: that
/// panic is caught here, once at start-up, with its message kept for the error and the default
/// hook's report silenced meanwhile.
fn new_cuda(n: usize) -> Result<Device> {
    let unavailable = |reason: String| ModelError::CudaUnavailable { ordinal: n, reason };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let made = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match made {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(unavailable(format!(
                "the CUDA driver failed (is an NVIDIA driver for CUDA 13 installed?): {text}"
            )))
        }
    }
}

/// How base weights are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dequantized at load to this float type; matmuls through gemm (scale with batch size).
    Dense(DType),
    /// Kept quantized (`QMatMul`); `None` keeps each tensor's stored type, `Some(t)`
    /// re-quantizes to `t` at load (Q8_0/Q4_0 have SIMD kernels on CPU, Q4_1 does not).
    Quantized(Option<GgmlDType>),
    /// loraplex's packed 4/8-bit layout for the integer CPU kernel ([`crate::kernels`]): GGUF
    /// blocks exactly as stored, float weights quantized to 8 bits per 32 values; activations
    /// quantized to 8 bits per 32 values inside each matmul. CPU only.
    Packed,
}

impl WeightFormat {
    /// Parses `--dtype`. `auto` picks the packed integer kernel on CPU (the fastest path at
    /// every batch size, and batch invariant: integer sums and a fixed float order per row);
    /// on CUDA/Metal it picks bf16/f16 dense.
    pub fn parse(spec: &str, device: &Device) -> Result<Self> {
        let fmt = match spec.trim().to_ascii_lowercase().as_str() {
            "auto" => match device {
                Device::Cpu => WeightFormat::Packed,
                Device::Cuda(_) => WeightFormat::Dense(DType::BF16),
                Device::Metal(_) => WeightFormat::Dense(DType::F16),
            },
            "f32" | "float32" => WeightFormat::Dense(DType::F32),
            "bf16" | "bfloat16" => WeightFormat::Dense(DType::BF16),
            "f16" | "float16" => WeightFormat::Dense(DType::F16),
            "quantized" | "gguf" => WeightFormat::Quantized(None),
            "q8_0" => WeightFormat::Quantized(Some(GgmlDType::Q8_0)),
            "q4_0" => WeightFormat::Quantized(Some(GgmlDType::Q4_0)),
            "packed" => WeightFormat::Packed,
            other => return Err(ModelError::DType(other.to_string())),
        };
        if fmt == WeightFormat::Packed && !device.is_cpu() {
            return Err(ModelError::DType(
                "packed (the packed integer kernels run on the CPU only; use bf16 or f16)".into(),
            ));
        }
        Ok(fmt)
    }

    /// The dtype activations and KV caches use with this format.
    pub fn activation_dtype(self) -> DType {
        match self {
            WeightFormat::Dense(dt) => dt,
            WeightFormat::Quantized(_) | WeightFormat::Packed => DType::F32,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightFormat::Dense(dt) => write!(f, "{dt:?}").map(|_| ()),
            WeightFormat::Quantized(None) => write!(f, "quantized (as stored)"),
            WeightFormat::Quantized(Some(t)) => write!(f, "quantized ({t:?})"),
            WeightFormat::Packed => write!(f, "packed"),
        }
    }
}
