//! LoRA as the model computes it, in one place: the weights of a loaded adapter (`weights`),
//! DoRA's magnitudes and weight norms (`dora`), LoRA and replaced rows on the embedding and
//! the output head (`vocab`),
//! a request's mix and the `c_i = s_i · alpha_i / r_i` terms each projection adds (`mix`), and
//! one step's operands over a batch of mixes, fast and reference paths (`step`), and a
//! training step's plain LoRA projection as one node with its backward (`train_linear`). The
//! `adapters` module reads and writes PEFT folders into and out of these types; nothing here
//! depends on it.

pub mod dora;
pub mod mix;
mod step;
pub mod train_linear;
pub mod vocab;
pub mod weights;

pub use dora::DoraRows;
pub use mix::{AdapterMix, MixEntry};
pub use step::StepLora;
pub use vocab::VocabAdapter;
pub use weights::{HostLoraWeights, LoraAdapter, LoraWeights};
