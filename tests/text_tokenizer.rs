//! The Qwen tokenizer (tests/fixtures/qwen-vocab/tokenizer.json, a copy of
//! shared/data/qwen-tokenizer/tokenizer.json) and the streaming detokenizer.

use std::path::Path;
use std::sync::OnceLock;

use qnext::text::{DecodeStream, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-vocab/tokenizer.json");
        Tokenizer::from_file(path).expect("fixture tokenizer loads")
    })
}

/// Text whose rare characters (historic CJK, math letters, ZWJ emoji sequences, hieroglyphs) are
/// split over several byte-level tokens: 44 of its 84 tokens decode alone to U+FFFD.
const SPLIT_TEXT: &str = "Rust 🦀 and 𠮷野家 龘靐齉 𝔘𝔫𝔦 🧑‍🤝‍🧑 👨‍👩‍👧‍👦 ﷽ ꧁꧂ 𓀀𓁐 — 日本語のテキスト、한국어 텍스트, Ελληνικά, עברית";

#[test]
fn encodes_like_hugging_face() {
    let t = tokenizer();
    // Ids from the Python `tokenizers` package on the same file.
    assert_eq!(
        t.encode("Hello, world!", false).unwrap(),
        [9707, 11, 1879, 0]
    );
    assert_eq!(
        t.encode("<|im_start|>user\n你好，世界！🌍👋🏽<|im_end|>\n", false)
            .unwrap(),
        [151644, 872, 198, 108386, 3837, 99489, 6313, 145691, 145707, 145375, 151645, 198]
    );
    // Qwen has no post-processor: adding special tokens adds nothing.
    assert_eq!(
        t.encode("<think>\nx\n</think>", true).unwrap(),
        [151667, 198, 87, 198, 151668]
    );
}

#[test]
fn vocabulary_and_added_tokens() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 151_669);
    for (id, token) in [
        (151643, "<|endoftext|>"),
        (151644, "<|im_start|>"),
        (151645, "<|im_end|>"),
        (151657, "<tool_call>"),
        (151658, "</tool_call>"),
        (151665, "<tool_response>"),
        (151666, "</tool_response>"),
        (151667, "<think>"),
        (151668, "</think>"),
    ] {
        assert_eq!(t.token_to_id(token), Some(id), "{token}");
        assert_eq!(t.id_to_token(id).as_deref(), Some(token));
    }
    assert_eq!(t.id_to_token(1879).as_deref(), Some("Ġworld"));
    assert_eq!(t.token_to_id("no such token"), None);
    assert_eq!(t.id_to_token(151_935), None);
}

#[test]
fn decode_round_trips_and_skips_only_special_tokens() {
    let t = tokenizer();
    let ids = t.encode(SPLIT_TEXT, false).unwrap();
    assert_eq!(t.decode(&ids, false).unwrap(), SPLIT_TEXT);
    // `<|im_start|>` is special, `<think>` is not (spec §12.2).
    assert_eq!(t.decode(&[151644, 872, 151645], true).unwrap(), "user");
    assert_eq!(
        t.decode(&[151667, 87, 151668], true).unwrap(),
        "<think>x</think>"
    );
    // Ids past the vocabulary (the model's padding rows) decode to nothing, as in HF.
    assert_eq!(t.decode(&[9707, 151_900, 0], false).unwrap(), "Hello!");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let err = Tokenizer::from_file("/nonexistent/tokenizer.json")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    assert!(Tokenizer::from_bytes(b"{not json", "inline").is_err());
}

/// Streams `ids` one at a time; returns the pieces, the flush included.
fn stream(ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let t = tokenizer();
    let mut s = DecodeStream::new(skip_special_tokens);
    let mut pieces = Vec::new();
    for &id in ids {
        if let Some(p) = s.step(t, id).unwrap() {
            pieces.push(p);
        }
    }
    pieces.extend(s.flush(t).unwrap());
    assert!(s.pending().is_empty());
    pieces
}

#[test]
fn stream_never_splits_a_character() {
    let t = tokenizer();
    let ids = t.encode(SPLIT_TEXT, false).unwrap();
    assert_eq!(ids.len(), 84);
    let split = ids
        .iter()
        .filter(|&&id| t.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(split > 20, "the text no longer exercises split characters");

    let pieces = stream(&ids, false);
    for p in &pieces {
        assert!(!p.contains('\u{FFFD}'), "broken character in piece {p:?}");
    }
    assert_eq!(pieces.concat(), SPLIT_TEXT);
    assert!(
        pieces.len() > 30,
        "pieces should follow tokens, got {}",
        pieces.len()
    );
}

#[test]
fn stream_matches_decode_with_special_tokens() {
    let t = tokenizer();
    let text = "<|im_start|>assistant\n<think>\n思考🤔…\n</think>\n\n答案：𠮷<|im_end|>";
    let ids = t.encode(text, false).unwrap();
    for skip in [false, true] {
        assert_eq!(
            stream(&ids, skip).concat(),
            t.decode(&ids, skip).unwrap(),
            "skip={skip}"
        );
    }
}

#[test]
fn stream_flush_releases_an_incomplete_character() {
    let t = tokenizer();
    let ids = t.encode("a𓀀", false).unwrap();
    assert_eq!(
        ids.len(),
        4,
        "the hieroglyph should take three byte-level tokens"
    );
    // Cut the hieroglyph short: the stream holds them back until the end, then releases
    // exactly what a full decode gives (U+FFFD for the incomplete character).
    let cut = &ids[..ids.len() - 1];
    let mut s = DecodeStream::new(false);
    let mut pieces: Vec<String> = Vec::new();
    for &id in cut {
        pieces.extend(s.step(t, id).unwrap());
    }
    assert_eq!(pieces.concat(), "a");
    assert!(!s.pending().is_empty());
    let tail = s.flush(t).unwrap().unwrap();
    assert!(tail.ends_with('\u{FFFD}'));
    assert_eq!(pieces.concat() + &tail, t.decode(cut, false).unwrap());
    assert_eq!(s.flush(t).unwrap(), None);
}

#[test]
fn stream_passes_over_unknown_ids() {
    let t = tokenizer();
    let mut s = DecodeStream::new(false);
    assert_eq!(s.step(t, 9707).unwrap().as_deref(), Some("Hello"));
    assert_eq!(s.step(t, 151_935).unwrap(), None);
    assert_eq!(s.step(t, 0).unwrap().as_deref(), Some("!"));
    assert_eq!(s.flush(t).unwrap(), None);
}

#[test]
fn stream_equals_decode_on_arbitrary_ids() {
    // Random ids make invalid UTF-8 in the middle of the text too (lone continuation bytes):
    // whatever the bytes, the pieces must add up to the full decode.
    let t = tokenizer();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m) as u32
    };
    for _ in 0..20 {
        let ids: Vec<u32> = (0..300)
            .map(|_| {
                // Mostly the byte tokens and short merges (ids < 300 are single bytes).
                if next(4) == 0 {
                    next(151_669)
                } else {
                    next(300)
                }
            })
            .collect();
        for skip in [false, true] {
            assert_eq!(stream(&ids, skip).concat(), t.decode(&ids, skip).unwrap());
        }
    }
}
