//! `y = x · Wᵀ` for every stored weight dtype: x is `[t, cols]` f32, W is `[rows, cols]`,
//! y is `[t, rows]`. Rows are split over the worker pool; each task runs the best kernel the
//! CPU has or the portable one. Weights are read once per call however many tokens the batch
//! has. Two precisions:
//! - [`Precision::Exact`]: f32 activations and accumulation; FP8 and BF16 weights are widened
//!   exactly, so results match the reference up to summation order (`x86::avx512`).
//! - [`Precision::Fast`]: BF16 and FP8 weights go through bfloat16 dot products where the CPU
//!   has them (`x86::bf16dot`, `x86::fp8dot`; activations rounded to bfloat16 — for FP8 after
//!   the block scale is applied to them — f32 accumulation). On CPUs with AVX2 but no AVX-512,
//!   FP8 and BF16 weights take f32 kernels of their own (`x86::avx2dot`: the FP8 block scale
//!   applied to the activation in f32 instead of to each weight; `x86::avx2gemm` for prompt
//!   chunks). Other weights, and CPUs with AVX-512 but without BF16, compute as `Exact`.
//!
//! Either way each token's result is the same whatever else is in the batch.

use std::ops::Range;
#[cfg(target_arch = "x86_64")]
use std::sync::Arc;

use super::isa::{isa, Isa};
use super::pool;
use super::split::{Piece, Split};
use crate::checkpoint::{Matrix, MatrixData};

/// How matrix products round their inputs (the CLI's `--exact`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Bfloat16 dot products for BF16 and FP8 weights where the CPU has them; on AVX2 CPUs,
    /// f32 kernels with the FP8 block scale on the activations.
    #[default]
    Fast,
    /// f32 activations and accumulation everywhere, weights as stored.
    Exact,
}

/// Multiply-adds below which a product runs on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 17;
/// The least work one claim of rows holds (`split.rs`): 64 KiB of FP8 weights for one
/// token. Claims halve what is left down to this, so threads end within about 2 µs of each
/// other at decode's ~30 GB/s per thread.
const MIN_CLAIM_WORK: usize = 1 << 16;

pub fn matmul(x: &[f32], t: usize, w: &Matrix, p: Precision) -> Vec<f32> {
    matmul_many(&[(x, t, w)], p).pop().unwrap_or_default()
}

/// One product of a batch: `x` (`[t, cols]`) times `w`ᵀ.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub x: &'a [f32],
    pub t: usize,
    pub w: &'a Matrix,
    /// Per token (or empty: none), whether it belongs to a prompt chunk, whose tokens go
    /// through the blocked product (`x86::bf16gemm`) on the fast path; other tokens go
    /// through the dot-product kernels. The two sum in different orders, so the choice must
    /// follow something of the token's own sequence, never the rest of the batch.
    pub bulk: &'a [bool],
}

impl<'a> Job<'a> {
    pub fn new(x: &'a [f32], t: usize, w: &'a Matrix) -> Job<'a> {
        Job { x, t, w, bulk: &[] }
    }

    pub fn bulk(self, bulk: &'a [bool]) -> Job<'a> {
        Job { bulk, ..self }
    }
}

/// A job's activations in the form its kernels read.
struct Prepared<'a> {
    acts: Acts<'a>,
    /// Runs of tokens and whether each goes through the blocked product.
    runs: Vec<(Range<usize>, bool)>,
    /// Unscaled bfloat16 activations for FP8 blocked runs.
    #[cfg(target_arch = "x86_64")]
    bf16: Option<Arc<super::x86::bf16dot::Bf16Acts>>,
    /// Per run (or empty: none), the blocked runs' activations for the AMX tiles.
    #[cfg(target_arch = "x86_64")]
    vnni: Vec<Option<Arc<super::x86::amx::VnniActs>>>,
    /// Per run (or empty: none), the blocked runs' tokens for the AVX2 tiles.
    #[cfg(target_arch = "x86_64")]
    avx2: Vec<Option<Arc<super::x86::avx2gemm::Tokens>>>,
}

enum Acts<'a> {
    F32(&'a [f32]),
    #[cfg(target_arch = "x86_64")]
    Bf16(Arc<super::x86::bf16dot::Bf16Acts>),
    /// Fast FP8: the kernel scales (and rounds) them per row block itself.
    #[cfg(target_arch = "x86_64")]
    Fp8Scaled(&'a [f32]),
    /// Fast path without AVX-512 (FP8 and BF16 weights): prompt-chunk tokens take the blocked
    /// product (`x86::avx2gemm`), others the dot products (`x86::avx2dot`, which applies FP8
    /// block scales to them per row block itself).
    #[cfg(target_arch = "x86_64")]
    Avx2(&'a [f32]),
}

/// Activations already rounded in this dispatch, by address, length and columns of the f32
/// input (and for the AMX form, the run's tokens): jobs often share theirs (gate and up,
/// q/k/v).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Rounded {
    bf16: Vec<(ActsKey, Arc<super::x86::bf16dot::Bf16Acts>)>,
    vnni: Vec<(RunKey, Arc<super::x86::amx::VnniActs>)>,
    avx2: Vec<(SpanKey, Arc<super::x86::avx2gemm::Tokens>)>,
}
/// An f32 input's address, length and columns.
#[cfg(target_arch = "x86_64")]
type ActsKey = (usize, usize, usize);
/// An f32 input and a run of its tokens.
#[cfg(target_arch = "x86_64")]
type SpanKey = (ActsKey, Range<usize>);
/// An f32 input, a run of its tokens, and the pair order of the kernel that reads them.
#[cfg(target_arch = "x86_64")]
type RunKey = (ActsKey, Range<usize>, super::x86::amx::PairOrder);
/// Nothing is rounded without the x86 kernels.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Default)]
struct Rounded;

fn prepare<'a>(job: &Job<'a>, p: Precision, rounded: &mut Rounded) -> Prepared<'a> {
    let (x, t) = (job.x, job.t);
    let whole = || vec![(0..t, false)];
    #[cfg(target_arch = "x86_64")]
    if p == Precision::Fast && isa() == Isa::Avx2 && super::x86::avx2dot::supports(job.w) {
        use super::x86::avx2gemm;
        let w = job.w;
        let runs = if job.bulk.len() == t && avx2gemm::supports(w) {
            runs(job.bulk)
        } else {
            whole()
        };
        let avx2 = runs
            .iter()
            .map(|(span, bulk)| {
                bulk.then(|| {
                    let key = ((x.as_ptr() as usize, x.len(), w.cols), span.clone());
                    if let Some((_, a)) = rounded.avx2.iter().find(|(k, _)| *k == key) {
                        return a.clone();
                    }
                    let xs = &x[span.start * w.cols..span.end * w.cols];
                    let a = Arc::new(avx2gemm::Tokens::new(xs, span.len(), w.cols));
                    rounded.avx2.push((key, a.clone()));
                    a
                })
            })
            .collect();
        return Prepared {
            acts: Acts::Avx2(x),
            runs,
            bf16: None,
            vnni: Vec::new(),
            avx2,
        };
    }
    #[cfg(target_arch = "x86_64")]
    if p == Precision::Fast && super::isa::bf16_dot() {
        use super::x86::{amx, bf16dot, bf16gemm, fp8dot};
        let w = job.w;
        let runs = if bf16gemm::supports(w) && job.bulk.len() == t {
            runs(job.bulk)
        } else {
            whole()
        };
        let any_bulk = runs.iter().any(|r| r.1);
        let key = (x.as_ptr() as usize, x.len(), w.cols);
        // Blocked runs go to the AMX tiles where the CPU has them.
        let amx = any_bulk && super::isa::amx();
        let vnni = if amx {
            runs.iter()
                .map(|(span, bulk)| {
                    bulk.then(|| {
                        let order = amx::pair_order(w);
                        let key = (key, span.clone(), order);
                        if let Some((_, a)) = rounded.vnni.iter().find(|(k, _)| *k == key) {
                            return a.clone();
                        }
                        let xs = &x[span.start * w.cols..span.end * w.cols];
                        // SAFETY: `isa::amx()` implies `bf16_dot()`: AVX-512 F, BW, BF16.
                        let a = Arc::new(unsafe { amx::vnni_acts(xs, span.len(), w.cols, order) });
                        rounded.vnni.push((key, a.clone()));
                        a
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut round = || {
            if let Some((_, a)) = rounded.bf16.iter().find(|(k, _)| *k == key) {
                return a.clone();
            }
            let a = Arc::new(bf16_acts(x, t, w.cols));
            rounded.bf16.push((key, a.clone()));
            a
        };
        if fp8dot::supports(w) {
            let bf16 = (any_bulk && !amx).then(&mut round);
            return Prepared {
                acts: Acts::Fp8Scaled(x),
                runs,
                bf16,
                vnni,
                avx2: Vec::new(),
            };
        }
        if bf16dot::supports(w) {
            return Prepared {
                acts: Acts::Bf16(round()),
                runs,
                bf16: None,
                vnni,
                avx2: Vec::new(),
            };
        }
    }
    let _ = (p, rounded);
    Prepared {
        acts: Acts::F32(x),
        runs: whole(),
        #[cfg(target_arch = "x86_64")]
        bf16: None,
        #[cfg(target_arch = "x86_64")]
        vnni: Vec::new(),
        #[cfg(target_arch = "x86_64")]
        avx2: Vec::new(),
    }
}

/// `x` (`[t, k]`) rounded to bfloat16, split over the pool when large (it runs before the
/// products, while the other threads would wait).
#[cfg(target_arch = "x86_64")]
fn bf16_acts(x: &[f32], t: usize, k: usize) -> super::x86::bf16dot::Bf16Acts {
    use super::x86::bf16dot::{acts_stride, fill_bf16, Bf16Acts};
    let stride = acts_stride(k);
    let mut data = vec![0u16; t * stride];
    let pool = pool::global();
    if t * k < PARALLEL_WORK / 2 || pool.threads() == 1 || t < 2 {
        // SAFETY: only called once `bf16_dot()` verified AVX-512 F, BW and BF16.
        unsafe { fill_bf16(x, t, k, stride, &mut data) };
    } else {
        let per = t.div_ceil(pool.threads());
        pool::for_each_chunk(&mut data, per * stride, &|i, rows| {
            let n = rows.len() / stride;
            let xs = &x[i * per * k..(i * per + n) * k];
            // SAFETY: as above.
            unsafe { fill_bf16(xs, n, k, stride, rows) };
        });
    }
    Bf16Acts { data, stride }
}

/// Maximal runs of equal flags.
#[cfg(target_arch = "x86_64")]
fn runs(flags: &[bool]) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &f) in flags.iter().enumerate() {
        match out.last_mut() {
            Some((r, g)) if *g == f => r.end = i + 1,
            _ => out.push((i..i + 1, f)),
        }
    }
    out
}

/// Several independent products in one dispatch to the pool (e.g. the gate and up
/// projections of every selected expert): fewer synchronisations per token, and the threads
/// keep streaming weights from one matrix into the next. Each result is exactly what
/// [`matmul`] gives.
pub fn matmul_many(jobs: &[(&[f32], usize, &Matrix)], p: Precision) -> Vec<Vec<f32>> {
    let jobs: Vec<Job> = jobs.iter().map(|&(x, t, w)| Job::new(x, t, w)).collect();
    products(&jobs, p)
}

/// [`matmul_many`] for jobs that may mark prompt-chunk tokens ([`Job::bulk`]).
pub fn products(jobs: &[Job], p: Precision) -> Vec<Vec<f32>> {
    for j in jobs {
        assert_eq!(j.x.len(), j.t * j.w.cols, "matmul: x is not [t, cols]");
    }
    let mut rounded = Rounded::default();
    let prepared: Vec<Prepared> = jobs.iter().map(|j| prepare(j, p, &mut rounded)).collect();
    drop(rounded);
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0.0f32; j.w.rows * j.t]).collect();
    let targets = Outputs(outs.iter_mut().map(|o| (o.as_mut_ptr(), o.len())).collect());
    // Rows r0..r1 of job j, written straight into the `[t, rows]` result by the kernel;
    // `then` is where the task reads next.
    let task = |j: usize, r0: usize, r1: usize, then: *const u8| {
        let Job { t, w, .. } = jobs[j];
        let (ptr, len) = targets.get(j);
        assert!(t * w.rows <= len && r1 <= w.rows);
        // SAFETY: the result has t·rows elements (asserted above), so rows r0..r1 of every
        // token are in bounds; no other task writes them, as tasks own disjoint row ranges of
        // a job. The buffers outlive the dispatch, which returns only once every task has
        // finished.
        let out = unsafe { OutRows::new(ptr.add(r0), w.rows) };
        rows_kernel(&prepared[j], t, w, r0, r1, out, then);
    };
    let pool = pool::global();
    let work: Vec<usize> = jobs.iter().map(|j| j.t * j.w.rows * j.w.cols).collect();
    let total: usize = work.iter().sum();
    // A run of pieces; `then` is where the caller reads after the last.
    let run_pieces = |pieces: &[Piece], then: *const u8| {
        for (i, &(j, r0, r1)) in pieces.iter().enumerate() {
            let next = pieces
                .get(i + 1)
                .map_or(then, |&(jn, rn, _)| jobs[jn].w.row_ptr(rn));
            task(j, r0, r1, next);
        }
    };
    let end = |jobs: &[Job]| {
        jobs.last()
            .map_or(std::ptr::null(), |j| j.w.row_ptr(j.w.rows))
    };
    if total < PARALLEL_WORK || pool.threads() == 1 {
        let all: Vec<Piece> = (0..jobs.len()).map(|j| (j, 0, jobs[j].w.rows)).collect();
        run_pieces(&all, end(jobs));
        return outs;
    }
    // The blocked product works on panels of 64 rows, so its units are whole panels; the
    // dot products' one-token tiles are 8 rows.
    let units: Vec<usize> = prepared
        .iter()
        .map(|a| if a.runs.iter().any(|r| r.1) { 64 } else { 8 })
        .collect();
    let rows: Vec<usize> = jobs.iter().map(|j| j.w.rows).collect();
    let split = Split::new(&work, &rows, &units, pool.threads(), MIN_CLAIM_WORK);
    pool.run(split.segments(), &|s| {
        split.drive(s, &mut |pieces, after| {
            let then = split
                .row_after(after)
                .map_or_else(|| end(jobs), |(j, r)| jobs[j].w.row_ptr(r));
            run_pieces(pieces, then)
        })
    });
    outs
}

/// A block of rows of a `[t, rows]` result that one task owns: element (row `r` of the
/// block, token `j`) is at `ptr + r + j·ts`.
#[derive(Clone, Copy)]
pub struct OutRows {
    ptr: *mut f32,
    /// Distance between tokens (the matrix's row count).
    pub ts: usize,
}

impl OutRows {
    /// # Safety
    /// Every element the users of this block write must lie inside one live allocation that
    /// nothing else reads or writes meanwhile.
    pub unsafe fn new(ptr: *mut f32, ts: usize) -> OutRows {
        OutRows { ptr, ts }
    }

    /// Address of (row `r`, token `j`); only computed, dereferenced by the caller.
    pub fn at(&self, r: usize, j: usize) -> *mut f32 {
        self.ptr.wrapping_add(r + j * self.ts)
    }

    /// The block from its row `r` and token `j` on.
    pub fn skip(&self, r: usize, j: usize) -> OutRows {
        OutRows {
            ptr: self.at(r, j),
            ts: self.ts,
        }
    }

    /// `[rows, t]` results computed elsewhere, written into place.
    ///
    /// # Safety
    /// As for [`OutRows::new`], for `local.len() / t` rows of `t` tokens.
    unsafe fn put_transposed(&self, local: &[f32], t: usize) {
        for (r, row) in local.chunks_exact(t).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                // SAFETY: within the block (the caller's guarantee).
                unsafe { *self.at(r, j) = v };
            }
        }
    }
}

/// Where each job's result goes: base pointer and length, written by tasks that own disjoint
/// elements (see `matmul_many`).
struct Outputs(Vec<(*mut f32, usize)>);

// SAFETY: the pointers are only written through, at disjoint indices per task, while the
// vectors they point into are alive and not otherwise accessed (`matmul_many`).
unsafe impl Sync for Outputs {}

impl Outputs {
    fn get(&self, j: usize) -> (*mut f32, usize) {
        self.0[j]
    }
}

/// Rows `r0..r1` into `out`, which must cover them for `t` tokens (see `products`).
/// Rows `r0..r1` of `w` times the prepared activations; `then` is where the caller reads next
/// (the streaming kernels prefetch it, in place of the rows after `r1`).
fn rows_kernel(
    a: &Prepared,
    t: usize,
    w: &Matrix,
    r0: usize,
    r1: usize,
    out: OutRows,
    then: *const u8,
) {
    let x = match &a.acts {
        Acts::F32(x) => *x,
        #[cfg(target_arch = "x86_64")]
        acts => {
            use super::x86::{amx, avx2dot, avx2gemm, bf16dot, bf16gemm, fp8dot};
            let k = w.cols;
            for (i, (span, bulk)) in a.runs.iter().enumerate() {
                let (j0, n) = (span.start, span.len());
                let o = out.skip(0, j0);
                if let Acts::Avx2(x) = acts {
                    let x = &x[j0 * k..(j0 + n) * k];
                    // `prepare` chose this form only where `isa()` verified AVX2, FMA and F16C
                    // and `avx2dot::supports(w)`, and made tokens for the blocked product only
                    // where `avx2gemm::supports(w)`; `o` covers rows r0..r1 of tokens j0..j0+n.
                    if let Some(Some(xt)) = a.avx2.get(i) {
                        // SAFETY: as above, for the blocked product.
                        unsafe { avx2gemm::rows(xt, w, r0..r1, o) };
                    } else {
                        // SAFETY: as above, for the dot products.
                        unsafe { avx2dot::rows(x, n, w, r0..r1, o, then) };
                    }
                    continue;
                }
                if let Some(Some(xv)) = a.vnni.get(i) {
                    // SAFETY: `prepare` made the AMX form only after `isa::amx()` (tiles
                    // allowed, AVX-512 F/BW/BF16) and `bf16gemm::supports(w)`, for tokens
                    // j0..j0+n and w's columns; `o` covers rows r0..r1 of them.
                    unsafe { amx::rows(xv, w, r0..r1, o) };
                    continue;
                }
                // The three forms below: `prepare` chose them only after `bf16_dot()` verified
                // AVX-512 F, BW and BF16 and the kernel's `supports(w)` held (for blocked runs
                // too); tokens j0..j0+n exist; `o` covers rows r0..r1 of them.
                match acts {
                    // SAFETY: as above.
                    Acts::Bf16(xb) if *bulk => unsafe { bf16gemm::rows(xb, j0, n, w, r0..r1, o) },
                    // SAFETY: as above.
                    Acts::Fp8Scaled(_) if *bulk => unsafe {
                        let xb = a.bf16.as_ref().expect("prepared for blocked runs");
                        bf16gemm::rows(xb, j0, n, w, r0..r1, o)
                    },
                    // SAFETY: as above.
                    Acts::Bf16(xb) => unsafe { bf16dot::rows(xb, j0, n, w, r0..r1, o, then) },
                    // SAFETY: as above.
                    Acts::Fp8Scaled(x) => unsafe {
                        fp8dot::rows(&x[j0 * k..(j0 + n) * k], n, w, r0..r1, o, then)
                    },
                    Acts::F32(_) | Acts::Avx2(_) => unreachable!(),
                }
            }
            return;
        }
    };
    let _ = then;
    // The f32 kernels compute `[rows, t]` blocks, placed afterwards.
    let mut local = vec![0.0f32; (r1 - r0) * t];
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable && super::exact::supports(w) {
        use super::x86::exact;
        // SAFETY: `isa()` verified AVX-512 F and BW, or AVX2, FMA and F16C, on this CPU.
        unsafe {
            match isa() {
                Isa::Avx512 => exact::rows_avx512(x, t, w, r0..r1, &mut local),
                _ => exact::rows_avx2(x, t, w, r0..r1, &mut local),
            }
        };
        // SAFETY: `out` covers rows r0..r1 of t tokens.
        unsafe { out.put_transposed(&local, t) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa() == Isa::Neon && super::exact::supports(w) {
        super::arm::exact::rows_neon(x, t, w, r0..r1, &mut local);
        // SAFETY: `out` covers rows r0..r1 of t tokens.
        unsafe { out.put_transposed(&local, t) };
        return;
    }
    rows_portable(x, t, w, r0, r1, &mut local);
    // SAFETY: `out` covers rows r0..r1 of t tokens.
    unsafe { out.put_transposed(&local, t) };
}

/// The portable kernel: each row widened to f32, then dot products. Compiled for AVX2+FMA and
/// AVX-512 too (chosen at run time) so the compiler's vectorisation uses the wider registers.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma+f16c"
))]
fn rows_portable(x: &[f32], t: usize, w: &Matrix, r0: usize, r1: usize, out: &mut [f32]) {
    let k = w.cols;
    let mut buf = vec![0.0f32; k];
    for r in r0..r1 {
        let row: &[f32] = match &w.data {
            MatrixData::F32(d) => &d.as_slice()[r * k..(r + 1) * k],
            _ => {
                w.row_f32(r, &mut buf);
                &buf
            }
        };
        for j in 0..t {
            out[(r - r0) * t + j] = dot(&x[j * k..(j + 1) * k], row);
        }
    }
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a · x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
