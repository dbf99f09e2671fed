//! How much stack llguidance needs to compile the deepest grammars the bounds of
//! `structured::limits` admit: compiles a chain of Lark rules or of `$ref`s on a thread with a
//! stack of the given size, directly through llguidance (the server's compile threads have
//! 256 MiB). A stack that is too small aborts the process ("stack overflow"), which is the
//! answer. Usage:
//!
//! ```sh
//! cargo run --release --example stack_probe -- lark 4500 14   # 4,500 chained rules, 14 MiB
//! cargo run --release --example stack_probe -- defs 1000 8     # 1,000 chained $refs, 8 MiB
//! ```
//!
//! Measured (2026-12-07, AMD EPYC, release build): 4,500 Lark rules (the 64 KiB bound) need
//! 12–14 MiB, 1,000 `$ref`s (the definitions bound) under 8 MiB; a pool thread's 2 MiB
//! overflowed at about 500 rules or 300 `$ref`s.

use candle_core::Device;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::InferenceCapabilities;
use loraplex::model::load::{load_model, DEFAULT_MODEL};
use loraplex::model::WeightFormat;

fn grammar(kind: &str, n: usize) -> TopLevelGrammar {
    if kind == "lark" {
        let mut s = String::from("start: r0\n");
        for i in 0..n {
            s.push_str(&format!("r{i}: \"a\" r{}\n", i + 1));
        }
        s.push_str(&format!("r{n}: \"b\"\n"));
        eprintln!("grammar of {} bytes", s.len());
        return TopLevelGrammar::from_lark(s);
    }
    let mut defs = serde_json::Map::new();
    for i in 0..n {
        let next = serde_json::json!({"$ref": format!("#/$defs/d{}", i + 1)});
        defs.insert(
            format!("d{i}"),
            serde_json::json!({"type": "object", "properties": {"x": next}}),
        );
    }
    defs.insert(format!("d{n}"), serde_json::json!({"type": "string"}));
    TopLevelGrammar::from_json_schema(serde_json::json!({"$ref": "#/$defs/d0", "$defs": defs}))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, n, mib] = &args[..] else {
        anyhow::bail!("usage: stack_probe lark|defs N STACK_MIB");
    };
    let (n, mib): (usize, usize) = (n.parse()?, mib.parse()?);
    let m = load_model(DEFAULT_MODEL, WeightFormat::Packed, &Device::Cpu)?;
    let json = m.tokenizer.inner.to_string(false).map_err(anyhow::Error::msg)?;
    let bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())?;
    let env = bytes.into_tok_env(Some(m.model.cfg.vocab_size))?;
    let caps = InferenceCapabilities::default();
    let mut factory =
        llguidance::ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())?;
    factory.quiet();
    let g = grammar(kind, n);
    let compiled = std::thread::Builder::new()
        .stack_size(mib << 20)
        .spawn(move || factory.create_parser(g).is_ok())?
        .join()
        .map_err(|_| anyhow::anyhow!("the compile thread panicked"))?;
    println!("{kind} {n} on a {mib} MiB stack: compiled={compiled}");
    Ok(())
}
