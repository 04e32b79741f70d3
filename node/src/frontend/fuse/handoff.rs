//! Stopping the session threads without unmounting, so a daemon that exits
//! while volumes are in use leaves their I/O to the holder and the next
//! daemon ([`FuseServer::hand_off`]).

use std::io;
use std::time::Duration;

use super::FuseServer;

impl FuseServer {
    /// Stops serving without unmounting, for a daemon that exits while
    /// volumes are still in use: each session thread finishes the request
    /// it is serving (its reply sent), then returns instead of reading
    /// another one (interrupted by a signal). Requests not read yet stay
    /// queued in the kernel and the holder keeps the connection for the
    /// next daemon, as across a crash. True when every thread returned
    /// within `timeout`: only then has every request read been answered.
    pub fn hand_off(self, timeout: Duration) -> bool {
        use std::os::unix::thread::JoinHandleExt;
        self.table
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        if let Err(e) = install_wakeup_handler() {
            tracing::error!(error = %e, "cannot interrupt the FUSE session threads");
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut threads = self.threads;
        loop {
            // A thread between its flag check and its read misses one
            // signal: signal again until it is gone.
            for h in threads.iter().filter(|h| !h.is_finished()) {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid; the signal's handler does nothing.
                unsafe { libc::pthread_kill(h.as_pthread_t(), WAKEUP_SIGNAL) };
            }
            let (done, running): (Vec<_>, Vec<_>) =
                threads.into_iter().partition(|h| h.is_finished());
            for h in done {
                let _ = h.join();
            }
            threads = running;
            if threads.is_empty() {
                return true;
            }
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    threads = threads.len(),
                    "FUSE session threads still serving at the hand-off deadline"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Interrupts a session thread's blocking read of `/dev/fuse` at hand-off.
const WAKEUP_SIGNAL: libc::c_int = libc::SIGUSR2;

extern "C" fn wakeup(_: libc::c_int) {}

/// A handler that does nothing, installed without `SA_RESTART` so that the
/// signal ends a blocking read with EINTR.
fn install_wakeup_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set a handler that is
    // async-signal-safe (it does nothing) and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = wakeup as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        if libc::sigaction(WAKEUP_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
