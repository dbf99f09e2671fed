use candle_core::Device;
use loraplex::model::load::load_model;
use loraplex::model::WeightFormat;
use loraplex::structured::{ConstraintSpec, Grammars};
use std::time::Instant;

fn main() {
    let m = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", WeightFormat::Packed, &Device::Cpu).unwrap();
    let g = Grammars::new(&m.tokenizer, m.model.cfg.vocab_size).unwrap();
    let which = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let spec = match which.as_str() {
        "lark" => {
            let mut s = String::from("start: r0\n");
            for i in 0..n { s.push_str(&format!("r{i}: \"a\" r{}\n", i + 1)); }
            s.push_str(&format!("r{n}: \"b\"\n"));
            ConstraintSpec::Lark(s)
        }
        "larkparen" => ConstraintSpec::Lark(format!("start: {}\"a\"{}\n", "(".repeat(n), ")".repeat(n))),
        "defs" => {
            let mut defs = serde_json::Map::new();
            for i in 0..n { defs.insert(format!("d{i}"), serde_json::json!({"type":"object","properties":{"x":{"$ref": format!("#/$defs/d{}", i+1)}}})); }
            defs.insert(format!("d{n}"), serde_json::json!({"type":"string"}));
            ConstraintSpec::JsonSchema(serde_json::json!({"$ref":"#/$defs/d0","$defs":defs}).to_string())
        }
        "props" => {
            let mut p = serde_json::Map::new();
            for i in 0..n { p.insert(format!("p{i}"), serde_json::json!({"type":"integer"})); }
            ConstraintSpec::JsonSchema(serde_json::json!({"type":"object","properties":p}).to_string())
        }
        "reqprops" => {
            let mut p = serde_json::Map::new();
            let mut r = vec![];
            for i in 0..n { p.insert(format!("p{i}"), serde_json::json!({"type":"integer"})); r.push(format!("p{i}")); }
            ConstraintSpec::JsonSchema(serde_json::json!({"type":"object","properties":p, "required": r}).to_string())
        }
        "nest" => {
            let mut s = serde_json::json!({"type":"string"});
            for _ in 0..n { s = serde_json::json!({"type":"array","items": s}); }
            ConstraintSpec::JsonSchema(s.to_string())
        }
        "anyof" => {
            let v: Vec<_> = (0..n).map(|i| serde_json::json!({"const": format!("v{i}")})).collect();
            ConstraintSpec::JsonSchema(serde_json::json!({"anyOf": v}).to_string())
        }
        "enum" => {
            let v: Vec<_> = (0..n).map(|i| format!("value-{i}")).collect();
            ConstraintSpec::JsonSchema(serde_json::json!({"enum": v}).to_string())
        }
        "regexalt" => ConstraintSpec::Regex((0..n).map(|i| format!("w{i}x")).collect::<Vec<_>>().join("|")),
        "regexnest" => ConstraintSpec::Regex(format!("{}a{}", "(".repeat(n), ")".repeat(n))),
        "rxblow" => ConstraintSpec::Regex(format!("[ab]*a[ab]{{{n}}}")),
        "larkblow" => ConstraintSpec::Lark(format!("start: /[ab]*a[ab]{{{n}}}/ \"c\"\n")),
        "choice" => ConstraintSpec::Choice((0..n).map(|i| format!("c{i}")).collect()),
        _ => panic!(),
    };
    let bytes = match &spec { ConstraintSpec::Lark(s) | ConstraintSpec::JsonSchema(s) | ConstraintSpec::Regex(s) => s.len(), _ => 0 };
    let stack: usize = std::env::var("STACK").ok().map(|s| s.parse().unwrap()).unwrap_or(2 << 20);
    let t = Instant::now();
    let r = std::thread::Builder::new().stack_size(stack).spawn(move || {
        let r = g.compile(&spec).map(|x| { let mut mm = x.matcher(); mm.compute_mask().map(|_| ()).map_err(|e| e.to_string()) });
        match r { Ok(Ok(())) => "ok".to_string(), Ok(Err(e)) => format!("mask err {}", &e[..e.len().min(300)]), Err(e) => format!("err {}", &e.to_string()[..e.to_string().len().min(300)]) }
    }).unwrap().join().unwrap();
    let rss = std::fs::read_to_string("/proc/self/status").unwrap().lines().find(|l| l.starts_with("VmRSS")).unwrap().to_string();
    println!("{which} n={n} bytes={bytes} {:?} {r} {rss}", t.elapsed());
}
