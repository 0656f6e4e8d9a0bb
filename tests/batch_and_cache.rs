//! The batch forward and the cache: a sequence's results must not depend on what else is in
//! the batch, snapshots must restore exactly, and rejected input must leave state untouched.

use qnext::cache::SeqCache;
use qnext::engine::score::{all_logprobs, Feed};
use qnext::kernels::activation::log_softmax;
use qnext::kernels::matmul::Precision;
use qnext::model::{Model, SeqInput, Want};
use std::path::Path;

fn load(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Feeds `seqs` together, each in its own pieces (piece sizes cycle per sequence; 0 = sit
/// this step out), and returns every sequence's logits at every position.
fn run_batched(model: &Model, seqs: &[Vec<u32>], pieces: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<SeqCache> = seqs.iter().map(|s| model.new_cache(s.len())).collect();
    let mut done = vec![0usize; seqs.len()];
    let mut logits: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    let mut step = 0;
    while done.iter().zip(seqs).any(|(&d, s)| d < s.len()) {
        let mut take = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let n = pieces[i][step % pieces[i].len()].min(s.len() - done[i]);
            take.push(n);
        }
        let mut batch: Vec<SeqInput> = Vec::new();
        let mut who = Vec::new();
        for (i, c) in caches.iter_mut().enumerate() {
            if take[i] > 0 {
                batch.push(SeqInput {
                    tokens: &seqs[i][done[i]..done[i] + take[i]],
                    cache: c,
                    want: Want::All,
                });
                who.push(i);
            }
        }
        if !batch.is_empty() {
            let out = model.forward(&mut batch).unwrap();
            for (o, &i) in out.iter().zip(&who) {
                logits[i].extend_from_slice(&o.logits);
                done[i] += take[i];
            }
        }
        step += 1;
    }
    logits
}

#[test]
fn batch_results_do_not_depend_on_the_batch() {
    for name in ["tiny-f32", "bf16-interval2", "fp8-f32scale"] {
        let model = load(name);
        let v = model.cfg.vocab_size;
        let seqs = vec![ids(150, 1, v), ids(90, 2, v), ids(70, 3, v), ids(5, 4, v)];
        let pieces = vec![
            vec![40, 1, 1, 64],
            vec![1, 0, 30],
            vec![0, 0, 70],
            vec![2, 1],
        ];
        let together = run_batched(&model, &seqs, &pieces);
        for (i, s) in seqs.iter().enumerate() {
            let alone = run_batched(
                &model,
                std::slice::from_ref(s),
                std::slice::from_ref(&pieces[i]),
            );
            assert_eq!(
                together[i], alone[0],
                "{name}: sequence {i} differs when batched with others"
            );
            assert_eq!(together[i].len(), s.len() * v);
        }
    }
}

#[test]
fn snapshot_restore_resumes_exactly() {
    // Exact products: the comparison below is between two chunkings of the DeltaNet prefill,
    // whose f32 rounding differences bfloat16 inputs would amplify.
    let mut model = load("bf16-interval2");
    model.precision = Precision::Exact;
    let v = model.cfg.vocab_size;
    let seq = ids(140, 9, v);
    let want = all_logprobs(&model, &seq, Feed::All).unwrap();

    let mut cache = model.new_cache(seq.len());
    model
        .forward(&mut [SeqInput {
            tokens: &seq[..100],
            cache: &mut cache,
            want: Want::Last,
        }])
        .unwrap();
    let snap = cache.snapshot();
    // A detour (e.g. rejected speculative tokens) that must leave no trace once restored.
    let detour = ids(25, 77, v);
    model
        .forward(&mut [SeqInput {
            tokens: &detour,
            cache: &mut cache,
            want: Want::Last,
        }])
        .unwrap();
    cache.restore(&snap).unwrap();
    assert_eq!(cache.pos(), 100);
    let out = model
        .forward(&mut [SeqInput {
            tokens: &seq[100..],
            cache: &mut cache,
            want: Want::All,
        }])
        .unwrap();
    let mut lsm = vec![0.0; v];
    for (i, row) in out[0].logits.chunks(v).enumerate() {
        log_softmax(row, &mut lsm);
        let p = 100 + i;
        let diff = lsm
            .iter()
            .zip(&want[p * v..(p + 1) * v])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // Same computation except the chunking of the DeltaNet prefill: f32 rounding only.
        assert!(diff < 1e-4, "position {p}: max |Δ| {diff}");
    }
    // Restored into another sequence (a shared prefix), the snapshot gives the same bits as
    // in its own; its K/V blocks are shared, so the first sequence's later rows stay its own.
    let mut other = model.new_cache(seq.len());
    other.restore(&snap).unwrap();
    let again = model
        .forward(&mut [SeqInput {
            tokens: &seq[100..],
            cache: &mut other,
            want: Want::All,
        }])
        .unwrap();
    assert_eq!(bits(&again[0].logits), bits(&out[0].logits));
    // A snapshot deeper than a sequence may grow cannot be restored into it.
    let mut short = model.new_cache(10);
    assert!(short.restore(&snap).is_err());
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn rejected_batches_leave_caches_untouched() {
    let model = load("tiny-f32");
    let v = model.cfg.vocab_size;
    let seq = ids(40, 5, v);
    let want = all_logprobs(&model, &seq, Feed::All).unwrap();
    let mut a = model.new_cache(seq.len());
    let mut b = model.new_cache(8);
    model
        .forward(&mut [SeqInput {
            tokens: &seq[..20],
            cache: &mut a,
            want: Want::Last,
        }])
        .unwrap();
    // Second sequence has an out-of-range id: the whole batch is refused, `a` not advanced.
    let bad = [1u32, v as u32 + 5];
    let err = model
        .forward(&mut [
            SeqInput {
                tokens: &seq[20..30],
                cache: &mut a,
                want: Want::Last,
            },
            SeqInput {
                tokens: &bad,
                cache: &mut b,
                want: Want::Last,
            },
        ])
        .err()
        .expect("out-of-range token must be rejected");
    assert!(err.to_string().contains("out of range"), "{err}");
    // Too long for its cache.
    let long = ids(9, 6, v);
    let err = model
        .forward(&mut [SeqInput {
            tokens: &long,
            cache: &mut b,
            want: Want::Last,
        }])
        .err()
        .expect("over-long input must be rejected");
    assert!(err.to_string().contains("context length"), "{err}");
    assert_eq!((a.pos(), b.pos()), (20, 0));

    let out = model
        .forward(&mut [SeqInput {
            tokens: &seq[20..],
            cache: &mut a,
            want: Want::All,
        }])
        .unwrap();
    let mut lsm = vec![0.0; v];
    log_softmax(&out[0].logits[..v], &mut lsm);
    let diff = lsm
        .iter()
        .zip(&want[20 * v..21 * v])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "state changed by a rejected batch: {diff}");
}

/// `decode_traffic` counts, from the configuration alone: every DeltaNet layer's conv history
/// and recurrent state twice (read and written back, f32) and every attention layer's K/V
/// rows once (bfloat16 on the fast path).
#[test]
fn decode_traffic_counts_the_states_twice_and_the_kv_rows_once() {
    let model = load("tiny-f32");
    assert_eq!(model.precision, Precision::Fast);
    let c = &model.cfg;
    let mut cache = model.new_cache(16);
    let linear = c
        .layer_types
        .iter()
        .filter(|t| matches!(t, qnext::config::LayerType::Linear))
        .count();
    let full = c.layer_types.len() - linear;
    let per_linear = 4
        * ((c.linear_conv_kernel_dim - 1) * c.linear_conv_dim()
            + c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim);
    let per_row = 2 * 2 * c.num_key_value_heads * c.head_dim;
    assert!(
        linear > 0 && full > 0,
        "the fixture has both kinds of layer"
    );
    assert_eq!(cache.decode_traffic(), 2 * linear * per_linear);
    let tokens = ids(5, 3, c.vocab_size);
    model
        .forward(&mut [SeqInput {
            tokens: &tokens,
            cache: &mut cache,
            want: Want::Last,
        }])
        .unwrap();
    assert_eq!(
        cache.decode_traffic(),
        2 * linear * per_linear + full * 5 * per_row
    );
}

/// Feeds `seq` as a prompt cut into pieces of `sizes`, the pieces grouped into steps of
/// `groups` pieces each (cycling), keeping the states after the pieces that end at `keep`
/// (positions); returns every position's logits, the cache, and the states kept.
fn prompt_in_steps(
    model: &Model,
    seq: &[u32],
    sizes: &[usize],
    groups: &[usize],
    keep: &[usize],
) -> (Vec<f32>, SeqCache, Vec<qnext::cache::Snapshot>) {
    let mut ends = vec![];
    let mut at = 0;
    for s in sizes {
        at += s;
        ends.push(at);
    }
    assert_eq!(at, seq.len());
    let mut cache = model.new_cache(seq.len());
    let (mut logits, mut kept) = (Vec::new(), Vec::new());
    let (mut piece, mut step) = (0, 0);
    while piece < ends.len() {
        let last = (piece + groups[step % groups.len()]).min(ends.len());
        let start = cache.pos();
        let offsets: Vec<usize> = ends[piece..last].iter().map(|e| e - start).collect();
        let keep_here: Vec<usize> = keep
            .iter()
            .filter(|&&k| k > start && k < ends[last - 1])
            .map(|k| k - start)
            .collect();
        cache.cut_prompt(&offsets, &keep_here);
        let out = model
            .forward(&mut [SeqInput {
                tokens: &seq[start..ends[last - 1]],
                cache: &mut cache,
                want: Want::All,
            }])
            .unwrap();
        logits.extend_from_slice(&out[0].logits);
        for k in keep.iter().filter(|&&k| k > start && k <= ends[last - 1]) {
            kept.push(cache.snapshot_at(*k).expect("state kept there"));
        }
        piece = last;
        step += 1;
    }
    (logits, cache, kept)
}

#[test]
fn pieces_give_the_same_bits_however_they_are_grouped_into_steps() {
    // The fast path (bfloat16 products, the blocked kernels for every prompt token): the
    // equality below is bit for bit, whatever the arithmetic.
    let model = load("bf16-interval2");
    let seq = ids(150, 21, model.cfg.vocab_size);
    // Short pieces (token by token in the DeltaNet) beside chunked ones, as chat markers cut.
    let sizes = [5, 40, 3, 64, 1, 37];
    let keep = [45, 48, 112];
    let (alone, cache_a, kept_a) = prompt_in_steps(&model, &seq, &sizes, &[1], &keep);
    for groups in [vec![6], vec![2, 4], vec![3, 1, 2]] {
        let (together, cache_b, kept_b) = prompt_in_steps(&model, &seq, &sizes, &groups, &keep);
        assert_eq!(bits(&alone), bits(&together), "logits, groups {groups:?}");
        assert_eq!(
            cache_a.fingerprint(),
            cache_b.fingerprint(),
            "groups {groups:?}"
        );
        // A state kept inside a step is the one a step ending there leaves: restored, the
        // rest of the prompt gives the same bits.
        for (a, b) in kept_a.iter().zip(&kept_b) {
            assert_eq!(a.pos(), b.pos());
            let mut ca = model.new_cache(seq.len());
            let mut cb = model.new_cache(seq.len());
            ca.restore(a).unwrap();
            cb.restore(b).unwrap();
            assert_eq!(ca.fingerprint(), cb.fingerprint(), "state at {}", a.pos());
        }
    }
    // And the pieces are not a no-op: one piece of 150 tokens gives other bits.
    let (whole, _, _) = prompt_in_steps(&model, &seq, &[150], &[1], &[]);
    assert_ne!(bits(&alone), bits(&whole));
}
