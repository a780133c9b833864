//! Running commands with a deadline, timing them and reading their peak RSS (wait4), plus Ctrl-C handling.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM only set a flag: loops check it and unwind, so the Drop guards clean up the lab.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Fails once Ctrl-C or SIGTERM was received.
pub fn check_interrupted() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A finished command.
pub struct Finished {
    pub wall: Duration,
    /// Peak resident set of the child (and anything it exec'd, e.g. nsenter -> pfwd), KiB.
    pub maxrss_kib: u64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion within `timeout` (killed after it). Fails on a non-zero exit unless `allow_fail`.
pub fn run(mut cmd: Command, timeout: Duration, allow_fail: bool) -> Result<Finished> {
    let shown = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let pid = child.id() as libc::pid_t;
    // wait4 (not Child::wait) because it also returns the child's own rusage, so the peak RSS is this
    // command's alone and not the maximum over every child we ever waited for (RUSAGE_CHILDREN).
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our unreaped child; pointers are valid for the call.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        let _ = tx.send((rc, status, usage.ru_maxrss, Instant::now()));
    });
    let (rc, status, maxrss, end) = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            // Not reaped yet (the waiter is still blocked), so the pid is still ours to kill.
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{shown} did not finish within {timeout:?} (killed)");
        }
    };
    drop(child);
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if rc != pid {
        bail!("waiting for {shown}: {}", std::io::Error::last_os_error());
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok && !allow_fail {
        bail!("{shown} failed (wait status {status:#x}): {}", stderr.trim());
    }
    Ok(Finished { wall: end - start, maxrss_kib: maxrss.max(0) as u64, stdout, stderr })
}

/// A spawned background command that is killed (and reaped) when dropped.
pub struct Background {
    child: std::process::Child,
    name: String,
    out: Option<thread::JoinHandle<String>>,
}

impl Background {
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        // Drained from the start, so a chatty child never blocks on a full pipe.
        let pipe = child.stdout.take();
        let out = thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        Ok(Self { child, name: name.into(), out: Some(out) })
    }

    pub fn try_wait(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits up to `timeout` for a normal exit; returns its stdout, or fails after killing it.
    pub fn finish(mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not finish within {timeout:?} (killed)", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(self.out.take().and_then(|h| h.join().ok()).unwrap_or_default())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
