//! How one dispatch of products shares its rows between threads so that they finish
//! together.
//!
//! The rows of all the dispatch's matrices, in job order, form one line of *units* (whole
//! tiles of a job's kernel), cut into one segment of equal work per thread. Each segment's
//! unclaimed units are one atomic `(front, back)` pair. Its owner claims from the front,
//! half of what is left each time (but not less than [`Split::new`]'s minimum), so it
//! streams one run of rows with few claims. A thread whose own segment is done claims from
//! the back of the segment with the most left, half of that each time.
//!
//! Halving keeps the ends close. When a helper arrives, the owner's claim in progress is at
//! most what it left unclaimed, so the helper can always take at least as much as the owner
//! still holds, and the two then finish within about one minimum claim of each other.
//!
//! Against the fixed plan it replaced (two tasks of equal work per thread, claimed in
//! order), decoding the 32-expert FP8 checkpoint with 2 threads, alternating in one process:
//! the main thread's waits at the ends of dispatches fell from 2.7–5.7 to 0.7–1.7 ms per
//! token (products and delta-rule heads together) and decode was 2.3 % faster (median of
//! 6 pairs of 24-token runs).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A run of rows of one job: `(job, first row, end row)`.
pub type Piece = (usize, usize, usize);

pub struct Split {
    jobs: Vec<JobUnits>,
    /// Per segment: `front << 32 | back`, in units; one cache line each, so that owners
    /// claiming from different segments do not contend.
    segments: Vec<Line>,
    min_units: usize,
}

#[repr(align(64))]
struct Line(AtomicU64);

struct JobUnits {
    /// The job's first unit on the line.
    first: usize,
    unit_rows: usize,
    rows: usize,
}

impl JobUnits {
    fn units(&self) -> usize {
        self.rows.div_ceil(self.unit_rows)
    }
}

impl Split {
    /// `work[j]` multiply-adds over `rows[j]` rows in tiles of `units[j]` rows, cut into
    /// `segments` segments; claims hold at least `min_work` multiply-adds where a job's units
    /// allow.
    pub fn new(
        work: &[usize],
        rows: &[usize],
        units: &[usize],
        segments: usize,
        min_work: usize,
    ) -> Split {
        let mut jobs = Vec::with_capacity(rows.len());
        let mut first = 0;
        for (&n, &u) in rows.iter().zip(units) {
            let job = JobUnits {
                first,
                unit_rows: u.max(1),
                rows: n,
            };
            first += job.units();
            jobs.push(job);
        }
        let total_units = first;
        assert!(
            total_units < u32::MAX as usize,
            "too many rows for one dispatch"
        );
        // Work per unit, job by job; the segment bounds cut the cumulative work evenly.
        let unit_work: Vec<usize> = jobs
            .iter()
            .zip(work)
            .map(|(j, &w)| (w / j.rows.max(1)).max(1) * j.unit_rows)
            .collect();
        let total: usize = jobs
            .iter()
            .zip(&unit_work)
            .map(|(j, w)| j.units() * w)
            .sum();
        let segments = segments.clamp(1, total_units.max(1));
        let mut bounds = vec![0usize];
        let mut acc = 0usize;
        for (j, &uw) in jobs.iter().zip(&unit_work) {
            for u in 0..j.units() {
                acc += uw;
                let want = bounds.len();
                if want < segments && acc * segments >= total * want {
                    bounds.push(j.first + u + 1);
                }
            }
        }
        while bounds.len() < segments {
            bounds.push(total_units);
        }
        bounds.push(total_units);
        let segs = bounds
            .windows(2)
            .map(|b| Line(AtomicU64::new(((b[0] as u64) << 32) | b[1] as u64)))
            .collect();
        let largest_unit = unit_work.iter().copied().max().unwrap_or(1);
        Split {
            jobs,
            segments: segs,
            min_units: min_work.div_ceil(largest_unit).max(1),
        }
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Segment `s`'s unclaimed units (before any claims: as first cut).
    #[cfg(test)]
    fn segment_units(&self, s: usize) -> Range<usize> {
        let v = self.segments[s].0.load(Ordering::Relaxed);
        (v >> 32) as usize..(v & 0xffff_ffff) as usize
    }

    /// Claims about half of segment `s`'s unclaimed units, from its front or its back.
    fn claim(&self, s: usize, from_back: bool) -> Option<Range<usize>> {
        let seg = &self.segments[s].0;
        let mut cur = seg.load(Ordering::Relaxed);
        loop {
            let (front, back) = ((cur >> 32) as usize, (cur & 0xffff_ffff) as usize);
            if front >= back {
                return None;
            }
            let left = back - front;
            let take = left.div_ceil(2).max(self.min_units).min(left);
            let (claimed, next) = if from_back {
                (back - take..back, (front, back - take))
            } else {
                (front..front + take, (front + take, back))
            };
            let packed = ((next.0 as u64) << 32) | next.1 as u64;
            match seg.compare_exchange_weak(cur, packed, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(claimed),
                Err(now) => cur = now,
            }
        }
    }

    /// The segment with the most unclaimed units, if any has some.
    fn fullest(&self) -> Option<usize> {
        let left = |s: &Line| {
            let v = s.0.load(Ordering::Relaxed);
            ((v & 0xffff_ffff) as usize).saturating_sub((v >> 32) as usize)
        };
        let (s, n) = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (i, left(s)))
            .max_by_key(|&(_, n)| n)?;
        (n > 0).then_some(s)
    }

    /// The pieces of units `u`, in order, appended to `out`.
    fn pieces(&self, u: Range<usize>, out: &mut Vec<Piece>) {
        let first_job = self
            .jobs
            .partition_point(|j| j.first + j.units() <= u.start);
        for (jj, job) in self.jobs.iter().enumerate().skip(first_job) {
            if job.first >= u.end {
                break;
            }
            let a = u.start.max(job.first) - job.first;
            let b = u.end.min(job.first + job.units()) - job.first;
            if a < b {
                out.push((jj, a * job.unit_rows, (b * job.unit_rows).min(job.rows)));
            }
        }
    }

    /// The row that follows unit `u`'s rows on the line: `(job, row)`, or `None` at the end.
    pub fn row_after(&self, u: usize) -> Option<(usize, usize)> {
        let j = self.jobs.partition_point(|j| j.first + j.units() <= u);
        let job = self.jobs.get(j)?;
        Some((j, (u - job.first) * job.unit_rows))
    }

    /// Works through segment `s` from its front, then helps the others from their backs,
    /// calling `f(pieces, next)` for each claim; `next` is the unit after the claim's last (where
    /// a front claim's owner reads next). Every unit of the line is handed to exactly one call
    /// of `f` over all threads driving this split.
    pub fn drive(&self, s: usize, f: &mut dyn FnMut(&[Piece], usize)) {
        let mut pieces = Vec::new();
        let mut run = |u: Range<usize>, f: &mut dyn FnMut(&[Piece], usize)| {
            pieces.clear();
            self.pieces(u.clone(), &mut pieces);
            f(&pieces, u.end);
        };
        while let Some(u) = self.claim(s, false) {
            run(u, f);
        }
        while let Some(v) = self.fullest() {
            if let Some(u) = self.claim(v, true) {
                run(u, f);
            }
        }
    }
}

/// Runs `f` over runs of `0..n`, items of about equal work, on the global pool: every item
/// is in exactly one run, and the threads end together as for products.
pub fn for_each_run(n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    let pool = super::pool::global();
    let split = Split::new(&[n], &[n], &[1], pool.threads(), 1);
    pool.run(split.segments(), &|s| {
        split.drive(s, &mut |pieces, _| {
            for &(_, a, b) in pieces {
                f(a..b)
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// (rows, units, work per job; segments; minimum claim work)
    type Case = (Vec<usize>, Vec<usize>, Vec<usize>, usize, usize);

    fn cases() -> Vec<Case> {
        vec![
            // A decode step's experts: 22 gate/up matrices of 512 rows, one token.
            (vec![512; 22], vec![8; 22], vec![512 * 2048; 22], 2, 1 << 16),
            // One large projection and a small one.
            (
                vec![12288, 64],
                vec![8, 8],
                vec![12288 * 2048, 64 * 2048],
                4,
                1 << 16,
            ),
            // Prompt chunks in panels of 64, uneven row counts.
            (
                vec![1000, 130, 7],
                vec![64, 64, 64],
                vec![1000 * 512, 130 * 512, 7 * 512],
                8,
                1 << 12,
            ),
            // More segments wanted than units exist.
            (vec![16], vec![8], vec![16 * 100], 8, 1),
        ]
    }

    /// Every row of every job is handed out exactly once, in whole units except at a job's
    /// end, however the threads interleave; segments start with about equal work.
    #[test]
    fn every_row_is_claimed_once_whatever_the_threads_do() {
        for (rows, units, work, segments, min_work) in cases() {
            for threads in [1usize, 2, 3, 8] {
                let split = Split::new(&work, &rows, &units, segments, min_work);
                let seen: Vec<Mutex<Vec<u32>>> =
                    rows.iter().map(|&n| Mutex::new(vec![0; n])).collect();
                std::thread::scope(|sc| {
                    for th in 0..threads {
                        let (split, seen, units, rows) = (&split, &seen, &units, &rows);
                        sc.spawn(move || {
                            // Threads beyond the segments only help; the first ones own.
                            let s = th % split.segments();
                            split.drive(s, &mut |pieces, _| {
                                for &(j, r0, r1) in pieces {
                                    assert!(r0 % units[j] == 0, "piece starts mid-unit");
                                    assert!(
                                        (r1 - r0) % units[j] == 0 || r1 == rows[j],
                                        "partial unit {r0}..{r1}"
                                    );
                                    let mut m = seen[j].lock().unwrap();
                                    for r in r0..r1 {
                                        m[r] += 1;
                                    }
                                    // Uneven speeds, so that helping happens.
                                    if th == 0 {
                                        std::thread::yield_now();
                                    }
                                }
                            });
                        });
                    }
                });
                for (j, m) in seen.iter().enumerate() {
                    let m = m.lock().unwrap();
                    assert!(
                        m.iter().all(|&c| c == 1),
                        "job {j}: rows claimed other than once with {threads} threads"
                    );
                }
                let split = Split::new(&work, &rows, &units, segments, min_work);
                let per_row: Vec<usize> = work.iter().zip(&rows).map(|(w, r)| w / r).collect();
                let unit_work = |u: usize| {
                    let mut p = Vec::new();
                    split.pieces(u..u + 1, &mut p);
                    p.iter()
                        .map(|&(j, a, b)| (b - a) * per_row[j])
                        .sum::<usize>()
                };
                let total: usize = work.iter().sum();
                let biggest = (0..split.segment_units(split.segments() - 1).end)
                    .map(unit_work)
                    .max()
                    .unwrap_or(0);
                for s in 0..split.segments() {
                    let w: usize = split.segment_units(s).map(unit_work).sum();
                    assert!(
                        w <= total.div_ceil(split.segments()) + biggest,
                        "segment {s} holds {w} of {total}"
                    );
                }
            }
        }
    }

    /// A lone driver of segment 0 does everything, front claims first, and each claim's
    /// `next` is the unit after it.
    #[test]
    fn one_thread_runs_the_whole_line_in_order_of_its_segment() {
        let split = Split::new(&[4096 * 64; 4], &[64; 4], &[8; 4], 2, 1);
        let mut claims = Vec::new();
        split.drive(0, &mut |pieces, next| claims.push((pieces.to_vec(), next)));
        // Segment 0 (jobs 0 and 1) front to back, halving: 8, 4, 2, 1, 1 units.
        let sizes: Vec<usize> = claims
            .iter()
            .map(|(p, _)| p.iter().map(|&(_, a, b)| (b - a) / 8).sum())
            .collect();
        assert_eq!(&sizes[..5], &[8, 4, 2, 1, 1]);
        assert_eq!(claims[0].0, vec![(0, 0, 64)]);
        assert_eq!(claims[0].1, 8);
        assert_eq!(split.row_after(8), Some((1, 0)));
        assert_eq!(split.row_after(32), None);
        let units: usize = sizes.iter().sum();
        assert_eq!(units, 32);
    }
}
