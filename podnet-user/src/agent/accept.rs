//! What the agent's accept loops (the unix socket, the metrics port) do
//! when `accept(2)` fails. An error there is almost never the listener's:
//! Linux hands a pending network error of the new connection to the
//! caller (accept(2), "Error handling": treat ECONNABORTED, EPROTO, ... like
//! EAGAIN), and EMFILE/ENFILE/ENOBUFS/ENOMEM mean the process or the
//! system is short of descriptors or memory for a moment. Ending the loop
//! on those ended the agent (the socket) or its health endpoint (the
//! metrics port) for good. Instead: retry at once after a connection's
//! error, back off briefly after a shortage (the queued connection stays in
//! the kernel's backlog; retrying at once would spin, since the listener
//! stays readable), and give up only when the listener itself is unusable.
//! Go's net/http and hyper's examples back off the same way.

use std::{
    io,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

/// How long a loop waits after a shortage before accepting again.
pub const SHORTAGE_BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per this long for a loop's shortages (the others
/// are counted in the next line).
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// What a failed `accept` means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// The new connection failed before it was accepted: accept the next.
    Connection,
    /// Descriptors or memory ran out: back off, then accept again.
    Shortage,
    /// The listener is unusable (closed, not a socket): end the loop.
    Listener,
}

impl AcceptFailure {
    #[must_use]
    pub fn of(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ETIMEDOUT,
            ) => Self::Connection,
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT | libc::EOPNOTSUPP) => {
                Self::Listener
            }
            // EMFILE, ENFILE, ENOBUFS, ENOMEM, and anything unknown: a
            // listener that keeps failing costs a log line per LOG_EVERY
            // and a wake-up per SHORTAGE_BACKOFF, an agent that ends costs
            // every new pod.
            _ => Self::Shortage,
        }
    }
}

/// One accept loop's handling of failures: its name for the log, and the
/// rate limit of its shortage lines.
#[derive(Debug)]
pub struct AcceptErrors {
    what: &'static str,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    #[must_use]
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Handles a failed accept: `Ok` once the loop may accept again (after
    /// a back-off for a shortage), `Err(error)` when the listener is
    /// unusable.
    pub async fn failed(&mut self, error: io::Error) -> Result<(), io::Error> {
        match AcceptFailure::of(&error) {
            AcceptFailure::Connection => {
                debug!(listener = self.what, error = %error, "a connection failed before it was accepted");
                Ok(())
            }
            AcceptFailure::Listener => Err(error),
            AcceptFailure::Shortage => {
                if self.should_log(Instant::now()) {
                    warn!(
                        listener = self.what,
                        error = %error,
                        more_since_last_line = self.unlogged,
                        backoff_ms = SHORTAGE_BACKOFF.as_millis(),
                        "accepting a connection failed; backing off and serving on"
                    );
                    self.unlogged = 0;
                } else {
                    self.unlogged += 1;
                }
                tokio::time::sleep(SHORTAGE_BACKOFF).await;
                Ok(())
            }
        }
    }

    fn should_log(&mut self, now: Instant) -> bool {
        match self.last_logged {
            Some(last) if now.duration_since(last) < LOG_EVERY => false,
            _ => {
                self.last_logged = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_apart() {
        let of = |errno| AcceptFailure::of(&io::Error::from_raw_os_error(errno));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(of(errno), AcceptFailure::Shortage, "{errno}");
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM] {
            assert_eq!(of(errno), AcceptFailure::Connection, "{errno}");
        }
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert_eq!(of(errno), AcceptFailure::Listener, "{errno}");
        }
        assert_eq!(
            AcceptFailure::of(&io::Error::other("no errno")),
            AcceptFailure::Shortage
        );
    }

    #[tokio::test]
    async fn a_shortage_backs_off_and_is_logged_at_most_once_per_period() {
        let mut errors = AcceptErrors::new("test");
        let started = Instant::now();
        for _ in 0..3 {
            errors
                .failed(io::Error::from_raw_os_error(libc::EMFILE))
                .await
                .expect("a shortage does not end the loop");
        }
        assert!(started.elapsed() >= 3 * SHORTAGE_BACKOFF);
        assert_eq!(errors.unlogged, 2, "one line, two counted for the next");
        assert!(
            errors
                .failed(io::Error::from_raw_os_error(libc::EBADF))
                .await
                .is_err()
        );
    }

    #[test]
    fn the_log_is_rate_limited() {
        let mut errors = AcceptErrors::new("test");
        let now = Instant::now();
        assert!(errors.should_log(now));
        assert!(!errors.should_log(now + LOG_EVERY / 2));
        assert!(errors.should_log(now + LOG_EVERY));
    }
}
