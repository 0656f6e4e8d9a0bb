//! Kernels against values computed by torch / transformers (`tools/gen_fixtures.py`).

use qnext::config::Config;
use qnext::kernels::delta_rule::{self, HeadInputs};
use qnext::kernels::fp8::e4m3_to_f32;
use qnext::kernels::rope::Rope;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Every one of the 256 codes, bit for bit (NaN codes as NaN).
#[test]
fn e4m3_all_codes_match_torch() {
    let t = json("e4m3_table.json");
    let values = t["values"].as_array().unwrap();
    assert_eq!(values.len(), 256);
    for (code, v) in values.iter().enumerate() {
        let ours = e4m3_to_f32(code as u8);
        match v.as_str() {
            Some("nan") => assert!(ours.is_nan(), "code {code:#04x}: expected NaN, got {ours}"),
            _ => {
                let want = v.as_f64().unwrap() as f32;
                assert_eq!(
                    ours.to_bits(),
                    want.to_bits(),
                    "code {code:#04x}: {ours} vs {want}"
                );
            }
        }
    }
}

/// inv_freq and the YaRN attention factor, from a config.json-style dict, against
/// transformers' Qwen3NextRotaryEmbedding. The frequencies are f32 in both; transformers
/// rounds `base ** (2i/d)` in f32 pow, we in f64 then to f32, so allow 2 ulp.
#[test]
fn rope_and_yarn_frequencies_match_transformers() {
    let cases = json("rope_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // Fill in the fields a full config needs; the rope fields come from the case.
        let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":1,
            "num_key_value_heads":1,"linear_conv_kernel_dim":4,"linear_key_head_dim":4,
            "linear_value_head_dim":4,"linear_num_key_heads":1,"linear_num_value_heads":1,
            "num_experts":0,"intermediate_size":8}"#,
        )
        .unwrap();
        for (k, v) in case["config"].as_object().unwrap() {
            cfg.insert(k.clone(), v.clone());
        }
        let c = Config::from_json(&cfg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let rope = Rope::new(&c.rope, c.head_dim);
        assert_eq!(
            rope.rotary_dim as u64,
            case["rotary_dim"].as_u64().unwrap(),
            "{name}"
        );
        let want: Vec<f32> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(rope.inv_freq.len(), want.len(), "{name}");
        for (i, (a, b)) in rope.inv_freq.iter().zip(&want).enumerate() {
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 2, "{name}: inv_freq[{i}] = {a}, transformers {b}");
        }
        let af = case["attention_scaling"].as_f64().unwrap() as f32;
        assert!(
            (rope.attention_factor - af).abs() <= 1e-6 * af,
            "{name}: attention factor {} vs {af}",
            rope.attention_factor
        );
    }
}

fn f32s(st: &safetensors::SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

/// Both of our delta-rule forms against transformers' `torch_recurrent_gated_delta_rule`,
/// with a non-zero initial state, 150 tokens (three chunks), 2 key heads shared by 4 value heads.
#[test]
fn delta_rule_matches_transformers() {
    let bytes = std::fs::read(fixture("delta_rule.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (q, qs) = f32s(&st, "q"); // l2-normed, not yet scaled (transformers scales inside)
    let (k, _) = f32s(&st, "k");
    let (v, vs) = f32s(&st, "v");
    let (g, _) = f32s(&st, "g");
    let (beta, _) = f32s(&st, "beta");
    let (s0, _) = f32s(&st, "initial_state");
    let (want_o, _) = f32s(&st, "out");
    let (want_s, _) = f32s(&st, "final_state");
    let (t, hk, dk) = (qs[qs.len() - 3], qs[qs.len() - 2], qs[qs.len() - 1]);
    let (hv, dv) = (vs[vs.len() - 2], vs[vs.len() - 1]);
    let scale = 1.0 / (dk as f32).sqrt();
    for form in ["recurrent", "chunked"] {
        let mut worst: f32 = 0.0;
        for h in 0..hv {
            let j = h / (hv / hk);
            let gather = |x: &[f32], heads: usize, d: usize, head: usize, mul: f32| -> Vec<f32> {
                (0..t)
                    .flat_map(|ti| {
                        x[(ti * heads + head) * d..(ti * heads + head + 1) * d]
                            .iter()
                            .map(move |v| v * mul)
                    })
                    .collect()
            };
            let qh = gather(&q, hk, dk, j, scale);
            let kh = gather(&k, hk, dk, j, 1.0);
            let vh = gather(&v, hv, dv, h, 1.0);
            let gh: Vec<f32> = (0..t).map(|ti| g[ti * hv + h]).collect();
            let bh: Vec<f32> = (0..t).map(|ti| beta[ti * hv + h]).collect();
            let x = HeadInputs {
                q: &qh,
                k: &kh,
                v: &vh,
                g: &gh,
                beta: &bh,
                dk,
                dv,
            };
            let mut s = s0[h * dk * dv..(h + 1) * dk * dv].to_vec();
            let mut o = vec![0.0; t * dv];
            if form == "recurrent" {
                delta_rule::recurrent(&x, &mut s, &mut o);
            } else {
                delta_rule::chunked(&x, &mut s, &mut o);
            }
            for ti in 0..t {
                for d in 0..dv {
                    worst = worst.max((o[ti * dv + d] - want_o[(ti * hv + h) * dv + d]).abs());
                }
            }
            for (a, b) in s.iter().zip(&want_s[h * dk * dv..(h + 1) * dk * dv]) {
                worst = worst.max((a - b).abs());
            }
        }
        // f32 on both sides, values O(1), 150 steps: 1e-5 leaves room for rounding only.
        assert!(worst < 1e-5, "{form}: max |Δ| = {worst}");
    }
}
