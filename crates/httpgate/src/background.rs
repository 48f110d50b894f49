//! CPU-heavy work that must not slow the serving threads: password hash
//! verifications (argon2id, tens of milliseconds of CPU each).
//!
//! Each job runs on a thread of its own whose nice value is raised to
//! [`NICE`] before the job starts, so that on a busy machine the kernel
//! lets a serving thread that wakes up run ahead of it: an attacker's
//! wrong passwords, verified until the backoff stops them, then cost the
//! other clients' requests almost no latency (measured by
//! `bench/abuse/login.sh`). The callers bound how many jobs run at once
//! (`auth.rs`: one per CPU, one per sandbox), so a thread per job is a
//! bounded cost, small beside the hash itself.
//!
//! It owns no state; the caller's future waits for the job's answer.

use tokio::sync::oneshot;

/// The nice value of a background job's thread (0 is the default; 19 the
/// lowest priority). 10 gives such a thread about a tenth of the CPU share
/// of a default thread it competes with, without starving it.
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

/// Raises the calling thread's nice value to [`NICE`]. On Linux the nice
/// value belongs to a thread, and `setpriority(PRIO_PROCESS, 0, ..)`
/// addresses the calling thread; a failure (not expected: raising one's
/// own nice value needs no privilege) leaves the default priority.
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; `who = 0` is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower a background thread's priority"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_runs_at_the_lower_priority_and_returns_its_result() {
        #[allow(unsafe_code)]
        fn own_nice() -> i32 {
            // SAFETY: as above; getpriority only reads.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        }
        let before = own_nice();
        let (nice, answer) = run(|| (own_nice(), 6 * 7)).await.unwrap();
        assert_eq!(answer, 42);
        assert_eq!(nice, NICE.max(before), "the job's thread is niced");
        assert_eq!(own_nice(), before, "the caller's thread is not");
    }

    #[tokio::test]
    async fn a_panicking_job_gives_none() {
        let r: Option<()> = run(|| panic!("job failed")).await;
        assert!(r.is_none());
    }
}
