//! The fuzz targets (`fuzz/targets.rs`) on every file of their corpora (`fuzz/corpus/*`): what
//! fuzzing found stays fixed, and the targets keep building without the fuzzing toolchain.
//! Then a short run of each on inputs mutated from the corpus with a fixed seed, so that a
//! change that breaks a target shows here and not only under `cargo fuzz`.

#[path = "../fuzz/targets.rs"]
mod targets;

/// Bytes mutated as a fuzzer's first steps do: bit flips, byte changes, deletions, repeats
/// and splices of another input, from a fixed seed.
fn mutants(corpus: &[Vec<u8>], count: usize) -> Vec<Vec<u8>> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: usize| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % n.max(1) as u64) as usize
    };
    (0..count)
        .map(|_| {
            let mut x = corpus[next(corpus.len())].clone();
            for _ in 0..1 + next(4) {
                if x.is_empty() {
                    x.push(next(256) as u8);
                    continue;
                }
                let at = next(x.len());
                match next(5) {
                    0 => x[at] ^= 1 << next(8),
                    1 => x[at] = next(256) as u8,
                    2 => {
                        let end = (at + 1 + next(16)).min(x.len());
                        x.drain(at..end);
                    }
                    3 => {
                        let end = (at + 1 + next(16)).min(x.len());
                        let piece = x[at..end].to_vec();
                        x.splice(at..at, piece);
                    }
                    _ => {
                        let other = &corpus[next(corpus.len())];
                        let from = next(other.len());
                        let piece = other[from..(from + 1 + next(32)).min(other.len())].to_vec();
                        x.splice(at..at, piece);
                    }
                }
            }
            x
        })
        .collect()
}

fn run(target: &str, f: fn(&[u8]), extra: usize) {
    let corpus: Vec<Vec<u8>> = targets::corpus(target)
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
    for input in corpus.iter().chain(&mutants(&corpus, extra)) {
        f(input);
    }
}

#[test]
fn request() {
    run("request", targets::request, 2000);
}

#[test]
fn chat_template() {
    run("chat_template", targets::chat_template, 300);
}

#[test]
fn output_parsers() {
    run("output_parsers", targets::output_parsers, 2000);
}

#[test]
fn config() {
    run("config", targets::config, 2000);
}

#[test]
fn safetensors_header() {
    // The harness itself is right: the fixture's own header loads.
    let seed = targets::corpus("safetensors_header")
        .into_iter()
        .find(|p| p.ends_with("fp8-bf16scale.json"))
        .expect("the fixture's header in the corpus");
    if let Err(e) = targets::load_with_header(&std::fs::read(seed).unwrap()) {
        panic!("the unchanged header does not load: {e:#}");
    }
    run("safetensors_header", targets::safetensors_header, 100);
}
