//! Keeping the thread pool's workers awake through a forward pass.
//!
//! A forward pass is hundreds of short parallel sections (a few per layer) with serial work
//! between them. Between sections, rayon's idle workers yield a few dozen times and then sleep
//! on a futex, so most sections began by waking a sleeping worker: the wake-up's system calls,
//! and a section that starts on one core until the other is scheduled. llama.cpp's workers spin
//! between the ops of a graph for the same reason. [`awake_during`] occupies every other worker
//! of the current pool with a loop that runs whatever parallel work the pass posts and yields
//! the core (not sleeps) when there is none, until the pass returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Runs `f` on this thread while the current rayon pool's other workers wait for its parallel
/// work without sleeping. Outside a pool, or in a pool of one thread, it just runs `f`.
///
/// A worker that is busy when it is called joins the wait once it looks for work; a wait that
/// finds none for a while ends early ([`wait_for_work`] says why).
pub fn awake_during<R>(f: impl FnOnce() -> R) -> R {
    let Some(caller) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        scope.spawn_broadcast(|_, ctx| {
            if ctx.index() != caller {
                wait_for_work(&done);
            }
        });
        // Set even if `f` panics, so the other workers stop waiting and the scope ends.
        let _finished = Finished(&done);
        f()
    })
}

/// Marks the pass finished when dropped (normally or by a panic).
struct Finished<'a>(&'a AtomicBool);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs the pool's pending jobs until `done`, yielding the core when there are none (so other
/// threads, e.g. candle's own elementwise workers, are not starved on a machine with no spare
/// core).
///
/// It also returns once no job has come for [`MAX_IDLE`]: a worker can start this wait inside
/// one of the pass's own jobs (it looked for its waiting job just before the pass posted it,
/// stole the pass's first job instead, and then, waiting there for a part the caller took,
/// ran the waiting job). That stolen job stays unfinished beneath the wait, the pass waits for
/// it, and no work comes until the wait ends: without a limit, a deadlock (seen once in a
/// default run after thousands of passes). Long idle stretches are rare otherwise: in the
/// default run (f32, 2026-12-07) 1.3 thousand of 121 thousand were over 1 ms, most of the
/// rest 0.1-0.5 ms (the serial work between sections); a worker that gives up on one sleeps as
/// rayon's own do, and the next section wakes it.
fn wait_for_work(done: &AtomicBool) {
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() > MAX_IDLE {
            return;
        }
        std::thread::yield_now();
    }
}

/// How long a waiting worker goes without a job before it stops waiting ([`wait_for_work`]).
const MAX_IDLE: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn runs_nested_parallel_work_and_returns_its_result() {
        for threads in [1, 2, 4] {
            let sum: u64 = pool(threads).install(|| {
                awake_during(|| {
                    (0..50u64)
                        .map(|i| (0..1000u64).into_par_iter().map(|j| i * j).sum::<u64>())
                        .sum()
                })
            });
            assert_eq!(sum, (0..50u64).sum::<u64>() * (0..1000u64).sum::<u64>());
        }
    }

    /// The waiting worker takes the pass's jobs: the pass posts one job at a time (the second
    /// half of a `join`, while it runs the first) until another thread has run one. A wait
    /// that only spun would never take one; the deadline turns that into a failure, not a hang.
    #[test]
    fn other_workers_run_the_passes_jobs() {
        let taken = pool(2).install(|| {
            let caller = rayon::current_thread_index();
            awake_during(|| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    let (_, ran_on) = rayon::join(
                        || {
                            let t = Instant::now();
                            while t.elapsed() < Duration::from_micros(200) {
                                std::hint::spin_loop();
                            }
                        },
                        rayon::current_thread_index,
                    );
                    if ran_on != caller {
                        return true;
                    }
                }
                false
            })
        });
        assert!(taken, "no job of the pass ran on the other worker");
    }

    /// The deadlock [`wait_for_work`] describes: many short passes of nested parallel work
    /// make its race likely (without the idle limit they hung in each of 5 runs, once after
    /// 525 passes). Passes run for up to 2 s a pool; the test fails only if none completes for
    /// 60 s (a hang), not on slowness: on a busy machine (CI runs other tests beside it) every
    /// pass waits for all the pool's threads to be scheduled.
    #[test]
    fn a_wait_started_inside_a_pass_job_does_not_deadlock_the_pass() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicU64;
        use std::sync::mpsc::RecvTimeoutError;
        for threads in [2, 4] {
            let passes = Arc::new(AtomicU64::new(0));
            let (tx, rx) = std::sync::mpsc::channel();
            let counter = Arc::clone(&passes);
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(2);
                let all_right = pool(threads).install(|| {
                    let mut all_right = true;
                    while Instant::now() < until && counter.load(Ordering::Relaxed) < 200_000 {
                        let sum =
                            awake_during(|| (0..64u64).into_par_iter().map(|j| j * j).sum::<u64>());
                        all_right &= sum == (0..64u64).map(|j| j * j).sum::<u64>();
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    all_right
                });
                let _ = tx.send(all_right);
            });
            let mut seen = 0;
            let all_right = loop {
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(all_right) => break all_right,
                    Err(RecvTimeoutError::Disconnected) => {
                        panic!("{threads} threads: passes panicked")
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        let now = passes.load(Ordering::Relaxed);
                        assert!(
                            now > seen,
                            "{threads} threads: no pass done in 60 s, after {now}"
                        );
                        seen = now;
                    }
                }
            };
            assert!(all_right, "{threads} threads: a pass returned a wrong sum");
        }
    }

    #[test]
    fn outside_a_pool_it_runs_inline() {
        assert_eq!(awake_during(|| 7), 7);
    }

    #[test]
    fn a_panic_in_the_pass_releases_the_workers() {
        let result = std::panic::catch_unwind(|| {
            pool(2).install(|| awake_during(|| -> u32 { panic!("pass failed") }))
        });
        assert!(result.is_err());
    }
}
