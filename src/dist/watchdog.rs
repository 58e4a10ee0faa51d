//! The collective watchdog: a background thread that ends the process when one collective has
//! been in progress for longer than the collective timeout.
//!
//! It exists because an MPI collective whose peer died or hangs never returns and MPI offers no
//! timeout of its own; without it a lost rank would leave the others waiting until the job's wall
//! time. It measures the time inside one collective only (from entering it to leaving it), so a
//! slow step does not trip it: ranks enter a step's collective at nearly the same time, and the
//! wait inside is how long the slowest peer lags.
//!
//! On firing it prints one `error:` line naming this rank, the collective, its sequence number
//! and, when the backend could tell, the ranks that never arrived, then `_exit(1)`s: neither
//! destructors nor atexit handlers run, since the main thread is stuck inside MPI and MPI's own
//! finalisation would wait on the dead peer too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `timeout_ms` when there is no timeout.
const NONE: u64 = u64::MAX;

struct Shared {
    rank: usize,
    timeout_ms: AtomicU64,
    /// When the current collective times out (ms since [`epoch`]); 0 while none is in progress.
    deadline_ms: AtomicU64,
    /// Collectives entered so far: names the one that hung, which tells ranks' logs apart.
    seq: AtomicU64,
    name: Mutex<&'static str>,
    /// What the backend knows about the collective in progress, e.g. ranks not yet arrived.
    detail: Mutex<String>,
}

/// The watchdog of one process's collectives. [`Watchdog::enter`] arms it for one collective.
pub struct Watchdog {
    shared: Arc<Shared>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], never 0 (which means "idle").
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

fn to_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(NONE, |t| (t.as_millis() as u64).max(1))
}

impl Watchdog {
    /// A watchdog for `rank`; its thread starts here, and with `timeout` None it never fires
    /// until [`Watchdog::set_timeout`] gives it one.
    pub fn new(rank: usize, timeout: Option<Duration>) -> Watchdog {
        let w = Watchdog::unwatched(rank);
        w.set_timeout(timeout);
        let watched = Arc::clone(&w.shared);
        let spawned = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || watch(&watched));
        if let Err(e) = spawned {
            // Training still works without it; only a lost peer would then hang this rank.
            eprintln!("warning: rank {rank}: no collective watchdog ({e}); a lost peer rank will make this one hang");
        }
        w
    }

    /// The bookkeeping without the thread, for the one-process world, whose collectives cannot
    /// hang: it never fires.
    pub fn unwatched(rank: usize) -> Watchdog {
        Watchdog {
            shared: Arc::new(Shared {
                rank,
                timeout_ms: AtomicU64::new(NONE),
                deadline_ms: AtomicU64::new(0),
                seq: AtomicU64::new(0),
                name: Mutex::new(""),
                detail: Mutex::new(String::new()),
            }),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        match self.shared.timeout_ms.load(Ordering::SeqCst) {
            NONE => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Takes effect from the next collective on.
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        self.shared.timeout_ms.store(to_ms(timeout), Ordering::SeqCst);
    }

    /// Arms the watchdog for the collective `name` until the guard is dropped.
    pub fn enter(&self, name: &'static str) -> Guard<'_> {
        let s = &self.shared;
        *s.name.lock().unwrap_or_else(|e| e.into_inner()) = name;
        s.detail.lock().unwrap_or_else(|e| e.into_inner()).clear();
        s.seq.fetch_add(1, Ordering::SeqCst);
        let timeout = s.timeout_ms.load(Ordering::SeqCst);
        let deadline = if timeout == NONE { NONE } else { now_ms().saturating_add(timeout) };
        s.deadline_ms.store(deadline, Ordering::SeqCst);
        Guard { watchdog: self }
    }

    /// Replaces what the firing message adds after the standard text (e.g. "rank 1 never
    /// arrived"), for a backend that can tell.
    pub fn set_detail(&self, detail: String) {
        *self.shared.detail.lock().unwrap_or_else(|e| e.into_inner()) = detail;
    }

    /// The sequence number of the collective in progress (or the last one): 1 for the first.
    pub fn seq(&self) -> u64 {
        self.shared.seq.load(Ordering::SeqCst)
    }

    /// The name of the collective in progress (or the last one).
    pub fn name(&self) -> &'static str {
        *self.shared.name.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Disarms the watchdog when the collective has completed.
pub struct Guard<'a> {
    watchdog: &'a Watchdog,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.watchdog.shared.deadline_ms.store(0, Ordering::SeqCst);
    }
}

fn watch(s: &Shared) {
    loop {
        let timeout = s.timeout_ms.load(Ordering::SeqCst);
        // A tenth of the timeout bounds how late it fires; 1 s keeps the thread all but idle.
        let poll = if timeout == NONE { 1000 } else { (timeout / 10).clamp(10, 1000) };
        std::thread::sleep(Duration::from_millis(poll));
        let deadline = s.deadline_ms.load(Ordering::SeqCst);
        if deadline != 0 && deadline != NONE && now_ms() > deadline {
            fire(s);
        }
    }
}

fn fire(s: &Shared) -> ! {
    let name = *s.name.lock().unwrap_or_else(|e| e.into_inner());
    let detail = s.detail.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let timeout = Duration::from_millis(s.timeout_ms.load(Ordering::SeqCst));
    let seq = s.seq.load(Ordering::SeqCst);
    let detail = if detail.is_empty() { String::new() } else { format!(" ({detail})") };
    eprintln!(
        "error: rank {}: collective {name} (#{seq}) did not complete within {:.1} s; a peer rank was lost or hung{detail}. Raise {} if a rank legitimately waits that long.",
        s.rank,
        timeout.as_secs_f64(),
        super::TIMEOUT_ENV
    );
    // SAFETY: _exit ends the process without running anything else; see the module docs.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs one of the `child_*` tests in a fresh copy of this test binary: firing ends the
    /// process, which must not be the one running the other tests.
    fn run_child(name: &str) -> (Option<i32>, String, Duration) {
        let t = Instant::now();
        let o = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("dist::watchdog::tests::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MOTRAIN_WATCHDOG_CHILD", "1")
            .output()
            .unwrap();
        // stderr first: the harness's `test NAME ... ` on stdout ends without a newline.
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        (o.status.code(), text, t.elapsed())
    }

    fn in_child() -> bool {
        std::env::var_os("MOTRAIN_WATCHDOG_CHILD").is_some()
    }

    #[test]
    fn child_hung_collective() {
        if !in_child() {
            return;
        }
        let w = Watchdog::new(3, Some(Duration::from_millis(300)));
        let _g = w.enter("test_all_reduce");
        std::thread::sleep(Duration::from_secs(10));
        println!("the watchdog did not fire");
    }

    #[test]
    fn child_prompt_collectives() {
        if !in_child() {
            return;
        }
        let w = Watchdog::new(3, Some(Duration::from_millis(300)));
        for _ in 0..5 {
            let _g = w.enter("test_all_reduce");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Idle time between collectives (a long step) is not counted.
        std::thread::sleep(Duration::from_millis(1000));
        w.set_timeout(None);
        {
            let _g = w.enter("test_barrier");
            std::thread::sleep(Duration::from_millis(600));
        }
        println!("the watchdog stayed quiet");
    }

    #[test]
    fn a_hung_collective_ends_the_process_naming_rank_and_collective() {
        let (code, text, took) = run_child("child_hung_collective");
        assert_eq!(code, Some(1), "{text}");
        let line = text.lines().find(|l| {
            l.starts_with(
                "error: rank 3: collective test_all_reduce (#1) did not complete within 0.3 s",
            )
        });
        assert!(line.is_some(), "{text}");
        assert!(!text.contains("did not fire"), "{text}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn collectives_that_complete_in_time_and_idle_time_do_not_fire() {
        let (code, text, _) = run_child("child_prompt_collectives");
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("the watchdog stayed quiet"), "{text}");
    }
}
