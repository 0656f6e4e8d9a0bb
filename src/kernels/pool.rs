//! A persistent worker pool for the kernels. Decode runs several hundred small parallel
//! regions per token, so dispatch must cost about a microsecond: workers spin briefly on a
//! shared state word before parking, and the calling thread works on the tasks too.
//!
//! Protocol: one `state` word holds `(generation, task count, next task)`. A job is published by
//! writing its closure pointer and then a new generation with `next = 0`. Workers claim a task
//! by a compare-and-swap that checks the generation is still theirs and the index is below the
//! count; only a successful claim dereferences the closure. The caller returns only when every
//! task of its generation has finished, so a successful claim always refers to a closure that
//! is still alive on the caller's stack.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

const IDX_BITS: u32 = 20;
const MAX_TASKS: usize = (1 << IDX_BITS) - 1;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// `gen << 40 | count << 20 | next`.
    state: AtomicU64,
    /// Points at the dispatcher's `&Job` (on its stack), valid while the generation has
    /// unfinished tasks.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    panicked: AtomicBool,
    sleeping: Vec<AtomicBool>,
    threads: Mutex<Vec<Thread>>,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One dispatcher at a time: the job slot is single.
    dispatch: Mutex<()>,
}

fn pack(gen: u64, count: usize, next: usize) -> u64 {
    (gen << (2 * IDX_BITS)) | ((count as u64) << IDX_BITS) | next as u64
}

fn unpack(s: u64) -> (u64, usize, usize) {
    (
        s >> (2 * IDX_BITS),
        ((s >> IDX_BITS) & IDX_MASK) as usize,
        (s & IDX_MASK) as usize,
    )
}

impl Shared {
    /// Claims and runs tasks of generation `gen` until none are left.
    fn work(&self, gen: u64) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (g, count, next) = unpack(s);
            if g != gen || next >= count {
                return;
            }
            // Read the job pointer before claiming; the claim validates it (module docs).
            let job = self.job.load(Ordering::Acquire) as *const &Job;
            match self.state.compare_exchange_weak(
                s,
                pack(g, count, next + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: task `next` of the live generation is ours; the dispatcher waits
                    // for it to finish before the `&Job` it points at (and the closure behind
                    // it) go out of scope, and it rewrites `job` only between generations.
                    let f: &Job = unsafe { *job };
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(next))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::AcqRel);
                    s = self.state.load(Ordering::Acquire);
                }
                Err(cur) => s = cur,
            }
        }
    }
}

impl Pool {
    /// A pool running tasks on the calling thread plus `workers` threads.
    pub fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: Mutex::new(Vec::new()),
        });
        for w in 0..workers {
            let sh = shared.clone();
            let h = thread::Builder::new()
                .name(format!("qnext-worker-{w}"))
                .spawn(move || worker(sh, w))
                .expect("spawning a worker thread");
            shared
                .threads
                .lock()
                .expect("pool lock")
                .push(h.thread().clone());
        }
        Pool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for every `i` in `0..tasks`, spread over the pool; returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers == 0 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        assert!(tasks <= MAX_TASKS, "too many tasks for one dispatch");
        let _one = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let sh = &*self.shared;
        let (gen, _, _) = unpack(sh.state.load(Ordering::Acquire));
        let gen = (gen + 1) & ((1 << (64 - 2 * IDX_BITS)) - 1);
        // Workers see the closure through a pointer to this local; erasing its lifetime is
        // sound because no task runs after we return (we wait for `done == tasks` below).
        let fref: &(dyn Fn(usize) + Sync) = f;
        sh.job.store(
            &fref as *const &(dyn Fn(usize) + Sync) as *mut (),
            Ordering::Release,
        );
        sh.done.store(0, Ordering::Relaxed);
        sh.state.store(pack(gen, tasks, 0), Ordering::Release);
        if sh.sleeping.iter().any(|s| s.load(Ordering::Relaxed)) {
            let threads = sh.threads.lock().unwrap_or_else(|e| e.into_inner());
            for (i, s) in sh.sleeping.iter().enumerate() {
                if s.swap(false, Ordering::AcqRel) {
                    threads[i].unpark();
                }
            }
        }
        sh.work(gen);
        while sh.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel task panicked on a worker thread");
        }
    }
}

fn worker(sh: Arc<Shared>, index: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let gen = loop {
            let (g, count, next) = unpack(sh.state.load(Ordering::Acquire));
            if g != seen && next < count {
                break g;
            }
            spins += 1;
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                sh.sleeping[index].store(true, Ordering::Release);
                // Re-check after announcing sleep, so a job published in between is not missed.
                let (g, count, next) = unpack(sh.state.load(Ordering::Acquire));
                if g != seen && next < count {
                    sh.sleeping[index].store(false, Ordering::Relaxed);
                    break g;
                }
                thread::park_timeout(Duration::from_millis(50));
                sh.sleeping[index].store(false, Ordering::Relaxed);
            }
            std::hint::spin_loop();
        };
        sh.work(gen);
        seen = gen;
    }
}

/// Runs `f(i, chunk)` for each `size`-element chunk of `data` (the last may be shorter),
/// spread over the global pool: per-row work over a buffer that tasks split between them.
pub fn for_each_chunk<T: Send>(data: &mut [T], size: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    // Each chunk behind its own (never contended) lock, so a task can borrow it mutably.
    let chunks: Vec<std::sync::Mutex<&mut [T]>> = data
        .chunks_mut(size.max(1))
        .map(std::sync::Mutex::new)
        .collect();
    global().run(chunks.len(), &|i| {
        let mut c = chunks[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i, &mut c);
    });
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The process-wide pool, sized by [`super::parallel::threads`].
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(super::parallel::threads().saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for tasks in [1usize, 2, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
    }

    #[test]
    fn borrows_from_the_callers_stack() {
        let pool = Pool::new(1);
        let data: Vec<u64> = (0..1000).collect();
        let sums: Vec<AtomicU64> = (0..10).map(|_| AtomicU64::new(0)).collect();
        pool.run(10, &|i| {
            let s: u64 = data[i * 100..(i + 1) * 100].iter().sum();
            sums[i].store(s, Ordering::Relaxed);
        });
        let total: u64 = sums.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 999 * 1000 / 2);
    }

    #[test]
    fn survives_idle_periods() {
        let pool = Pool::new(1);
        let n = AtomicUsize::new(0);
        pool.run(4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(300));
        pool.run(4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
