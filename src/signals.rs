//! Stop requests from the outside world: SIGTERM (SLURM preemption, `kill`), SIGINT (Ctrl-C) and
//! SIGUSR1 (SLURM's `--signal=USR1@T` warning) only set a flag here; the train loop polls
//! [`stop_requested`] at step boundaries (agreeing across ranks with `Dist::all_agree`), saves
//! and exits with [`exit_code`]. A second SIGINT exits at once with 130, without saving, for a
//! user whose save is stuck.
//!
//! Handlers are installed through signal-hook's flag API, which only stores to atomics from the
//! handler (async-signal-safe), rather than by hand with libc.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub use signal_hook::consts::signal::{SIGINT, SIGTERM, SIGUSR1};

/// The signals `motrain train` stops on unless configured otherwise.
pub const DEFAULT_STOP_SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGUSR1];

/// The number of the last stop signal received; 0 while none has arrived.
static STOP: AtomicUsize = AtomicUsize::new(0);
/// Set by the first SIGINT; arms the immediate exit on the next one.
static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);
/// Signals already hooked: signal-hook adds an action per registration, and a second one would
/// make a single SIGINT both arm and fire the immediate exit.
static INSTALLED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Installs the stop handlers for `signals` (typically [`DEFAULT_STOP_SIGNALS`]); calling it again
/// for an already hooked signal does nothing. Fails for signals that cannot be caught (SIGKILL,
/// SIGSTOP) or that signal-hook forbids (SIGSEGV, SIGILL, SIGFPE).
pub fn install(signals: &[i32]) -> io::Result<()> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    for &sig in signals {
        if installed.contains(&sig) {
            continue;
        }
        if signal_hook::consts::FORBIDDEN.contains(&sig) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("signal {sig} cannot be used to stop training"),
            ));
        }
        if sig == SIGINT {
            // Registered before the flag setter: actions run in registration order, so the first
            // SIGINT finds the condition false and only the second one exits.
            signal_hook::flag::register_conditional_shutdown(
                SIGINT,
                exit_code(SIGINT),
                &SIGINT_SEEN,
            )?;
            signal_hook::flag::register(SIGINT, &SIGINT_SEEN)?;
        }
        signal_hook::flag::register_usize(sig, &STOP, sig as usize)?;
        installed.push(sig);
    }
    Ok(())
}

/// The signal that asked training to stop, if one has arrived since the start (or [`clear`]).
pub fn stop_requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig as i32),
    }
}

/// Signals that may be configured to stop training, by name: those schedulers and users send to
/// ask a job to end (SLURM: TERM, or any via `--signal`; PBS/LSF: USR2, XCPU).
const NAMED: [(&str, i32); 8] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("ALRM", libc::SIGALRM),
    ("XCPU", libc::SIGXCPU),
];

/// A stop signal as a user writes it (`SIGTERM`, `TERM`, `term` or `15`); None for an unknown
/// name or a signal that cannot stop training (KILL, STOP, SEGV, ...).
pub fn parse(name: &str) -> Option<i32> {
    let t = name.trim();
    if let Ok(n) = t.parse::<i32>() {
        return NAMED.iter().any(|(_, s)| *s == n).then_some(n);
    }
    let upper = t.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMED.iter().find(|(n, _)| *n == bare).map(|(_, s)| *s)
}

/// The names [`parse`] accepts, for an error message.
pub fn valid_names() -> String {
    NAMED.iter().map(|(n, _)| format!("SIG{n}")).collect::<Vec<_>>().join(", ")
}

/// Forgets a stop request (not the SIGINT count): for a caller that has handled it and carries
/// on, e.g. the agreement step when another rank initiated the stop.
pub fn clear() {
    STOP.store(0, Ordering::SeqCst);
}

/// The shell's convention for a death by signal, which schedulers and `timeout` understand:
/// 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_hook::low_level::raise;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Handlers run on the thread the kernel picks; give the store a moment to become visible.
    fn wait_for(sig: i32) -> Option<i32> {
        let t = Instant::now();
        while stop_requested() != Some(sig) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop_requested()
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(SIGTERM), 143);
        assert_eq!(exit_code(SIGINT), 130);
        assert_eq!(exit_code(SIGUSR1), 138);
    }

    // SIGINT stays out of this in-process test: a stray second one would end the test binary.
    #[test]
    fn each_stop_signal_is_recorded_and_the_process_lives_on() {
        install(&[SIGTERM, SIGUSR1]).unwrap();
        install(&[SIGTERM, SIGUSR1]).unwrap();
        clear();
        assert_eq!(stop_requested(), None);
        raise(SIGUSR1).unwrap();
        assert_eq!(wait_for(SIGUSR1), Some(SIGUSR1));
        raise(SIGTERM).unwrap();
        assert_eq!(wait_for(SIGTERM), Some(SIGTERM));
        clear();
        assert_eq!(stop_requested(), None);
    }

    #[test]
    fn signal_names_parse_as_users_write_them() {
        for (name, sig) in [
            ("SIGTERM", SIGTERM),
            ("term", SIGTERM),
            (" USR1 ", SIGUSR1),
            ("sigusr2", libc::SIGUSR2),
            ("15", 15),
        ] {
            assert_eq!(parse(name), Some(sig), "{name}");
        }
        for bad in ["KILL", "SIGSTOP", "9", "SEGV", "", "SIG", "TERMINATE", "-15", "999"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(valid_names().starts_with("SIGHUP, SIGINT"), "{}", valid_names());
        for (n, _) in NAMED {
            assert_eq!(parse(&format!("SIG{n}")).map(|s| install(&[s]).is_ok()), Some(true), "{n}");
        }
    }

    #[test]
    fn uncatchable_signals_are_refused() {
        assert!(install(&[signal_hook::consts::signal::SIGSEGV]).is_err());
        assert!(install(&[libc::SIGKILL]).is_err());
    }

    /// Runs one of the `child_*` tests below in a fresh copy of this test binary, where raising
    /// SIGINT cannot disturb the other tests.
    fn run_child(name: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("signals::tests::{name}"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MOTRAIN_SIGNALS_CHILD", "1")
            .output()
            .unwrap()
    }

    fn in_child() -> bool {
        std::env::var_os("MOTRAIN_SIGNALS_CHILD").is_some()
    }

    #[test]
    fn child_one_sigint() {
        if !in_child() {
            return;
        }
        install(&DEFAULT_STOP_SIGNALS).unwrap();
        raise(SIGINT).unwrap();
        assert_eq!(wait_for(SIGINT), Some(SIGINT));
        println!("survived one SIGINT");
    }

    #[test]
    fn child_two_sigints() {
        if !in_child() {
            return;
        }
        install(&DEFAULT_STOP_SIGNALS).unwrap();
        raise(SIGINT).unwrap();
        assert_eq!(wait_for(SIGINT), Some(SIGINT));
        raise(SIGINT).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        println!("survived two SIGINTs");
    }

    #[test]
    fn one_sigint_requests_a_stop_and_a_second_exits_with_130() {
        let one = run_child("child_one_sigint");
        let stdout = String::from_utf8_lossy(&one.stdout);
        assert_eq!(one.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&one.stderr));
        assert!(stdout.contains("survived one SIGINT"), "{stdout}");

        let two = run_child("child_two_sigints");
        let stdout = String::from_utf8_lossy(&two.stdout);
        assert_eq!(
            two.status.code(),
            Some(130),
            "{stdout}{}",
            String::from_utf8_lossy(&two.stderr)
        );
        assert!(!stdout.contains("survived two SIGINTs"), "{stdout}");
    }
}
