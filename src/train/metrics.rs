//! SQuAD's official answer metrics: exact match and token F1 after normalisation (lower-case,
//! no punctuation, no articles a/an/the, single spaces), best over the reference answers.

/// The official `normalize_answer`.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !is_punct(*c)).collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `string.punctuation` (ASCII), as the official script uses.
fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}

pub fn exact_match(pred: &str, truth: &str) -> f64 {
    f64::from(u8::from(normalize(pred) == normalize(truth)))
}

pub fn f1(pred: &str, truth: &str) -> f64 {
    let p: Vec<String> = normalize(pred).split_whitespace().map(str::to_string).collect();
    let t: Vec<String> = normalize(truth).split_whitespace().map(str::to_string).collect();
    if p.is_empty() || t.is_empty() {
        return f64::from(u8::from(p == t));
    }
    let mut counts = std::collections::HashMap::<&str, i64>::new();
    for w in &t {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / t.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// `(EM, F1)` of one prediction, each the best over the references (unanswerable: `[""]`).
pub fn score(pred: &str, refs: &[String]) -> (f64, f64) {
    let empty = [String::new()];
    let refs = if refs.is_empty() { &empty[..] } else { refs };
    let em = refs.iter().map(|r| exact_match(pred, r)).fold(0.0, f64::max);
    let f = refs.iter().map(|r| f1(pred, r)).fold(0.0, f64::max);
    (em, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_follows_the_official_script() {
        assert_eq!(normalize("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize("an Apple, a pear."), "apple pear");
        assert_eq!(normalize("Theatre"), "theatre", "articles only as whole words");
    }

    #[test]
    fn em_and_f1_on_hand_checked_cases() {
        assert_eq!(exact_match("the Broncos", "Broncos"), 1.0);
        assert_eq!(exact_match("Denver Broncos", "Broncos"), 0.0);
        // pred {denver, broncos}, truth {broncos}: P = 1/2, R = 1 → F1 = 2/3.
        assert!((f1("Denver Broncos", "Broncos") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1("Carolina", "Broncos"), 0.0);
        // Repeated tokens count once each: pred {a, b, b}, truth {b}: P = 1/3, R = 1 → 0.5.
        assert!((f1("x y y", "y") - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_best_reference_counts() {
        let refs = vec!["Denver Broncos".to_string(), "Broncos".to_string()];
        assert_eq!(score("Broncos", &refs), (1.0, 1.0));
        let (em, f) = score("the Denver team", &refs);
        assert_eq!(em, 0.0);
        assert!((f - 0.5).abs() < 1e-12, "{f}");
        assert_eq!(score("", &[]), (1.0, 1.0), "unanswerable: an empty prediction is right");
    }
}
