use candle_core::Device;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::InferenceCapabilities;
use loraplex::model::load::load_model;
use loraplex::model::WeightFormat;
fn main() {
    let m = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", WeightFormat::Packed, &Device::Cpu).unwrap();
    let json = m.tokenizer.inner.to_string(false).unwrap();
    let bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes()).unwrap();
    let env = bytes.into_tok_env(Some(m.model.cfg.vocab_size)).unwrap();
    let mut f = llguidance::ParserFactory::new(&env, InferenceCapabilities::default(), &SlicedBiasComputer::general_slices()).unwrap();
    f.quiet();
    let which = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let stack: usize = std::env::args().nth(3).unwrap().parse::<usize>().unwrap() << 20;
    let g = match which.as_str() {
        "lark" => { let mut s = String::from("start: r0\n"); for i in 0..n { s.push_str(&format!("r{i}: \"a\" r{}\n", i + 1)); } s.push_str(&format!("r{n}: \"b\"\n")); eprintln!("bytes {}", s.len()); TopLevelGrammar::from_lark(s) }
        _ => { let mut defs = serde_json::Map::new(); for i in 0..n { defs.insert(format!("d{i}"), serde_json::json!({"type":"object","properties":{"x":{"$ref": format!("#/$defs/d{}", i+1)}}})); } defs.insert(format!("d{n}"), serde_json::json!({"type":"string"})); TopLevelGrammar::from_json_schema(serde_json::json!({"$ref":"#/$defs/d0","$defs":defs})) }
    };
    let r = std::thread::Builder::new().stack_size(stack).spawn(move || { let p = f.create_parser(g).map(|_| ()).map_err(|e| e.to_string()); p.is_ok() }).unwrap().join().unwrap();
    println!("{which} {n} stack {}MB ok={r}", stack >> 20);
}
