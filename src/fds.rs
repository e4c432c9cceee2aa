//! File descriptors: every open connection costs one, so `--max-conns` only
//! means something if the process may open that many.
//!
//! The usual soft limit is 1,024 while the hard limit is far higher. At start
//! the daemon raises its soft limit to the hard one and, if `--max-conns` still
//! does not fit, lowers it (with a warning) so that the client past the limit
//! gets the documented `unavailable` refusal instead of `accept` failing with
//! EMFILE, and descriptors stay free for the database, the bus, the listeners
//! and `/healthz`.

/// Descriptors kept back from connections: stdio, the two listeners, the
/// runtime's own, the database pools (SQLite opens three files a connection)
/// and the bus, with a margin.
pub const HEADROOM: u64 = 128;

/// The descriptor limits, as found and as raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The soft limit the process started with.
    pub soft_before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the most the soft one may be raised to).
    pub hard: u64,
}

/// Raises the soft descriptor limit as far as allowed. On a system without
/// such limits, reports them as unlimited.
pub fn raise() -> FdLimits {
    let Ok((soft_before, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return FdLimits {
            soft_before: u64::MAX,
            soft: u64::MAX,
            hard: u64::MAX,
        };
    };
    // increase_nofile_limit knows the platforms' caps (macOS's OPEN_MAX).
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(soft_before);
    FdLimits {
        soft_before,
        soft,
        hard,
    }
}

/// How many connections fit in `soft` descriptors.
pub fn connections_that_fit(soft: u64) -> u64 {
    // A tiny limit keeps half for connections rather than none.
    soft.saturating_sub(HEADROOM).max(soft / 2)
}

/// Raises the descriptor limit, logs it, and returns `max_conns` lowered to
/// what fits.
pub fn fit_max_conns(max_conns: u32) -> u32 {
    let limits = raise();
    tracing::info!(
        soft = limits.soft,
        hard = limits.hard,
        was = limits.soft_before,
        "file descriptor limit"
    );
    let fit = connections_that_fit(limits.soft);
    if u64::from(max_conns) <= fit {
        return max_conns;
    }
    let lowered = u32::try_from(fit).unwrap_or(u32::MAX).max(1);
    tracing::warn!(
        max_conns,
        lowered,
        "--max-conns {max_conns} does not fit in {} file descriptors ({HEADROOM} kept for the \
         database, bus and listeners): serving at most {lowered} connections; raise the hard \
         limit (ulimit -Hn, systemd LimitNOFILE=) to allow more",
        limits.soft
    );
    lowered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_headroom() {
        assert_eq!(connections_that_fit(1_024), 896);
        assert_eq!(connections_that_fit(1_048_576), 1_048_448);
        assert_eq!(connections_that_fit(100), 50);
        assert_eq!(connections_that_fit(u64::MAX), u64::MAX - HEADROOM);
    }

    #[test]
    fn raising_never_lowers() {
        let limits = raise();
        assert!(limits.soft >= limits.soft_before);
        assert!(limits.soft <= limits.hard);
    }
}
