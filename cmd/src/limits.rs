//! The process's open-file limit and the connection cap derived from it.
//!
//! Every downstream connection, upstream connection, config file and log pipe is a file
//! descriptor. The binary raises its soft limit to the hard one at start (as Go's runtime
//! does for go-kratos/gateway), and by default allows half of it to downstream connections,
//! so the other half stays free for the upstream connections those requests need: a flood
//! of idle sockets then meets the connection cap, not `EMFILE`.

use proxy::server::DEFAULT_MAX_CONNECTIONS;

/// The default of `--max-connections`: half the open-file limit, at most
/// [`DEFAULT_MAX_CONNECTIONS`] (10,000), at least 64.
pub fn default_max_connections() -> usize {
    let half = open_file_limit().map_or(DEFAULT_MAX_CONNECTIONS, |limit| {
        usize::try_from(limit / 2).unwrap_or(usize::MAX)
    });
    half.clamp(64, DEFAULT_MAX_CONNECTIONS)
}

/// Raises the soft open-file limit to the hard limit; returns `(old, new)` when it changed.
pub fn raise_open_file_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let current = limit.current?;
        let raised = limit.maximum.unwrap_or(u64::MAX);
        if raised <= current {
            return None;
        }
        let new = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, new).ok()?;
        Some((current, raised))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The soft open-file limit, when the platform has one.
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_is_half_the_open_file_limit_within_bounds() {
        let cap = default_max_connections();
        assert!((64..=DEFAULT_MAX_CONNECTIONS).contains(&cap), "{cap}");
        if let Some(limit) = open_file_limit() {
            let half = usize::try_from(limit / 2).unwrap_or(usize::MAX);
            assert_eq!(cap, half.clamp(64, DEFAULT_MAX_CONNECTIONS));
        }
    }
}
