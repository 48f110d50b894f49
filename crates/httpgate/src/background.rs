//! CPU-heavy work that must not slow the serving threads: password hash
//! verifications (argon2id, tens of milliseconds of CPU each).
//!
//! Each job runs on a thread of its own whose nice value is raised by
//! [`NICE`] over the daemon's (at most to 19) before the job starts, so that on a busy machine the kernel
//! lets a serving thread that wakes up run ahead of it: an attacker's
//! wrong passwords, verified until the backoff stops them, then cost the
//! other clients' requests almost no latency (measured by
//! `bench/abuse/login.sh`). The callers bound how many jobs run at once
//! (`auth.rs`: one per CPU, one per sandbox), so a thread per job is a
//! bounded cost, small beside the hash itself.
//!
//! It owns no state; the caller's future waits for the job's answer.

use tokio::sync::oneshot;

/// How many nice levels a background job's thread runs below the thread
/// that started it (0 is the default nice value; 19 the lowest priority).
/// 10 gives such a thread about a tenth of the CPU share of the serving
/// threads it competes with, without starving it.
pub(crate) const NICE: i32 = 10;

/// Runs `job` on a new low-priority thread and waits for its result;
/// `None` if the thread could not be started or the job panicked.
pub(crate) async fn run<T, F>(job: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("httpgate-hash".into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(job());
        })
        .ok()?;
    rx.await.ok()
}

/// Raises the calling thread's nice value by [`NICE`] over what it
/// inherited (capped at 19), so that the job always runs below the serving
/// threads, also in a daemon started niced (setting 10 outright would give
/// a daemon at 19 background threads of higher priority than its own). On
/// Linux the nice value belongs to a thread, and
/// `setpriority(PRIO_PROCESS, 0, ..)` addresses the calling thread; a
/// failure (not expected: raising one's own nice value needs no privilege)
/// leaves the inherited priority.
#[allow(unsafe_code)]
fn lower_priority() {
    let target = (own_nice() + NICE).min(19);
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; `who = 0` is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower a background thread's priority"
        );
    }
}

/// The calling thread's nice value. `getpriority` may return -1 as a
/// value, so errno is cleared first and read after.
#[allow(unsafe_code)]
fn own_nice() -> i32 {
    // SAFETY: __errno_location gives this thread's errno slot; getpriority
    // takes plain integers and only reads.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_runs_at_the_lower_priority_and_returns_its_result() {
        let before = own_nice();
        let (nice, answer) = run(|| (own_nice(), 6 * 7)).await.unwrap();
        assert_eq!(answer, 42);
        assert_eq!(
            nice,
            (before + NICE).min(19),
            "the job's thread runs below its caller"
        );
        assert_eq!(own_nice(), before, "the caller's thread is not");
    }

    #[tokio::test]
    async fn a_panicking_job_gives_none() {
        let r: Option<()> = run(|| panic!("job failed")).await;
        assert!(r.is_none());
    }
}
