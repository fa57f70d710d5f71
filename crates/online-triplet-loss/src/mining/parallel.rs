//! Runs the native kernels on libtorch's own OpenMP threads.
//!
//! libtorch's intra-op threads spin for a while after each operation. A
//! second set of threads (a rayon pool, or threads started per call) then
//! competes with them for the cores, which on a small machine costs more
//! than the work itself. On Linux, tch links the libgomp that libtorch uses,
//! so the kernels join the same OpenMP team with `GOMP_parallel` (what
//! `#pragma omp parallel` compiles to); elsewhere they use scoped threads.

use std::ops::Range;
use std::sync::Mutex;

/// Below this many distances a chunk is mined on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// Runs `f(rows, out)` over contiguous blocks of `0..rows`, where `out` is
/// the part of `output` that belongs to those rows (`stride` elements per
/// row), and returns the blocks' results in row order.
pub(super) fn in_blocks<O: Send, R: Send>(
    rows: usize,
    row_len: usize,
    output: &mut [O],
    stride: usize,
    f: impl Fn(Range<usize>, &mut [O]) -> R + Sync,
) -> Vec<R> {
    let threads = threads_for(rows, rows * row_len);
    let per_block = rows.div_ceil(threads.max(1)).max(1);
    let mut ends: Vec<usize> = (1..=threads).map(|t| (t * per_block).min(rows)).collect();
    ends.dedup();
    run_blocks(&ends, output, stride, f)
}

/// [`in_blocks`] for rows of uneven work: row `r` costs `work(r)` elements,
/// and the blocks split the total evenly.
pub(super) fn in_weighted_blocks<O: Send, R: Send>(
    rows: usize,
    work: impl Fn(usize) -> usize,
    output: &mut [O],
    stride: usize,
    f: impl Fn(Range<usize>, &mut [O]) -> R + Sync,
) -> Vec<R> {
    let total: usize = (0..rows).map(&work).sum();
    let threads = threads_for(rows, total);
    let mut ends = Vec::with_capacity(threads);
    let mut done = 0;
    for r in 0..rows {
        done += work(r);
        // Close a block once its share of the total is reached.
        if done * threads >= total * (ends.len() + 1) && ends.len() + 1 < threads {
            ends.push(r + 1);
        }
    }
    ends.push(rows);
    ends.dedup();
    run_blocks(&ends, output, stride, f)
}

/// The number of threads for `rows` rows of `elements` in all.
fn threads_for(rows: usize, elements: usize) -> usize {
    if elements < PARALLEL_ELEMENTS {
        1
    } else {
        (tch::get_num_threads().max(1) as usize).min(rows).max(1)
    }
}

/// Runs `f` over the blocks of rows that end at `ends` (ascending, the last
/// one the number of rows), in parallel.
fn run_blocks<O: Send, R: Send>(
    ends: &[usize],
    output: &mut [O],
    stride: usize,
    f: impl Fn(Range<usize>, &mut [O]) -> R + Sync,
) -> Vec<R> {
    let rows = ends.last().copied().unwrap_or(0);
    if ends.len() <= 1 {
        return vec![f(0..rows, output)];
    }
    let mut blocks = Vec::with_capacity(ends.len());
    let mut rest = output;
    let mut start = 0;
    for &end in ends {
        let (block, tail) = std::mem::take(&mut rest).split_at_mut((end - start) * stride);
        rest = tail;
        blocks.push(Mutex::new(Some((start..end, block))));
        start = end;
    }
    let results: Vec<Mutex<Option<R>>> = blocks.iter().map(|_| Mutex::new(None)).collect();
    run_team(blocks.len(), &|i| {
        let taken = blocks[i].lock().map(|mut b| b.take()).ok().flatten();
        if let Some((range, block)) = taken {
            let r = f(range, block);
            if let Ok(mut slot) = results[i].lock() {
                *slot = Some(r);
            }
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .expect("every block runs exactly once")
        })
        .collect()
}

/// Calls `task(i)` for every `i < tasks`, in parallel.
#[cfg(target_os = "linux")]
fn run_team(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    use std::ffi::{c_int, c_uint, c_void};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

    extern "C" {
        fn GOMP_parallel(
            f: extern "C" fn(*mut c_void),
            data: *mut c_void,
            threads: c_uint,
            flags: c_uint,
        );
        fn omp_get_thread_num() -> c_int;
        fn omp_get_num_threads() -> c_int;
    }

    struct Shared<'a> {
        tasks: usize,
        task: &'a (dyn Fn(usize) + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Shared` below, alive until GOMP_parallel returns.
        let shared = unsafe { &*(data as *const Shared) };
        // SAFETY: plain queries of the OpenMP runtime inside a parallel region.
        let (me, team) = unsafe { (omp_get_thread_num(), omp_get_num_threads()) };
        let (me, team) = (me.max(0) as usize, team.max(1) as usize);
        // The team may be smaller than asked for: each member takes every team-th task.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            (me..shared.tasks)
                .step_by(team)
                .for_each(|i| (shared.task)(i))
        }));
        if let Err(panic) = outcome {
            if let Ok(mut slot) = shared.panic.lock() {
                slot.get_or_insert(panic);
            }
        }
    }

    let shared = Shared {
        tasks,
        task,
        panic: Mutex::new(None),
    };
    // SAFETY: `member` only reads `shared`, which outlives the call; a panic
    // never crosses the C frames, it is carried out and resumed here.
    unsafe {
        GOMP_parallel(
            member,
            &shared as *const Shared as *mut c_void,
            tasks as c_uint,
            0,
        );
    }
    if let Some(panic) = shared.panic.into_inner().ok().flatten() {
        resume_unwind(panic);
    }
}

#[cfg(not(target_os = "linux"))]
fn run_team(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    std::thread::scope(|scope| {
        for i in 1..tasks {
            scope.spawn(move || task(i));
        }
        task(0);
    });
}
