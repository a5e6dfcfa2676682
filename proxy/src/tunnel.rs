//! Tunnels for HTTP/1.1 upgrades (WebSocket and any other protocol).
//!
//! Once the upstream has answered `101 Switching Protocols` and the answer is on its way
//! downstream, both connections are handed over (the client's by `crate::server` once the
//! `101` is written, see `server::upgrade`; the upstream's by hyper) and a spawned task
//! copies bytes both ways (`tokio::io::copy_bidirectional`: each direction waits for the
//! other side to take what it has, so a slow reader slows its writer down). The tunnel ends
//! when both directions have ended, when it has been idle for [`DEFAULT_TUNNEL_IDLE_TIMEOUT`]
//! (or the proxy's setting), when one side has closed and the other has sent nothing for
//! [`HALF_CLOSED_LINGER`], or when the proxy closes its tunnels; then both connections are
//! shut down and dropped, so nothing is left half open.
//!
//! A tunnel belongs to no router: a config reload, and the old router's close, do not cut
//! it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use middleware::EndpointInfo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::TunnelMetrics;
use crate::server::upgrade::Downstream;

/// How long a tunnel may carry no byte either way before both sides are closed (default
/// 60 s). Set per proxy with [`crate::Proxy::with_tunnel_idle_timeout`].
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Once one side has closed, how long the other may stay silent before the tunnel is
/// closed (or the idle timeout, when shorter).
pub const HALF_CLOSED_LINGER: Duration = Duration::from_secs(5);

/// How long closing a tunnel waits for each side's shutdown (a TLS close, a flush).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(1);

/// What every tunnel of a proxy shares: its idle timeout and the signal that closes it.
#[derive(Clone)]
pub(crate) struct Tunnels {
    idle_timeout: Duration,
    close: CancellationToken,
}

impl Default for Tunnels {
    fn default() -> Self {
        Self::new(DEFAULT_TUNNEL_IDLE_TIMEOUT)
    }
}

impl Tunnels {
    pub(crate) fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            close: CancellationToken::new(),
        }
    }

    /// The same tunnels with another idle timeout (zero means the default).
    pub(crate) fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = if idle_timeout.is_zero() {
            DEFAULT_TUNNEL_IDLE_TIMEOUT
        } else {
            idle_timeout
        };
        self
    }

    /// Closes every open tunnel (and any opened later).
    pub(crate) fn close(&self) {
        self.close.cancel();
    }

    /// The signal that closes the tunnels.
    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.close.clone()
    }

    /// Spawns the tunnel between the two upgraded connections; it starts once hyper has
    /// written the `101` downstream.
    pub(crate) fn open(
        &self,
        downstream: Downstream,
        upstream: OnUpgrade,
        metrics: TunnelMetrics,
        endpoint: Arc<EndpointInfo>,
    ) {
        let tunnels = self.clone();
        tokio::spawn(async move {
            tunnels
                .run(downstream, upstream, metrics, &endpoint.path)
                .await;
        });
    }

    async fn run(
        self,
        downstream: Downstream,
        upstream: OnUpgrade,
        metrics: TunnelMetrics,
        endpoint: &str,
    ) {
        // The upstream side is ready already; the downstream one once the 101 is written.
        let handover = async {
            let upstream = async { upstream.await.map_err(io::Error::other) };
            tokio::try_join!(downstream.resolve(), upstream)
        };
        let (downstream, upstream) = match tokio::time::timeout(self.idle_timeout, handover).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(err)) => {
                tracing::debug!(endpoint, %err, "upgrade not completed");
                return;
            }
            Err(_) => {
                tracing::debug!(endpoint, "upgrade not completed in time");
                return;
            }
        };
        metrics.opened.inc();
        metrics.open.inc();
        let _open = OpenTunnel(&metrics.open);
        let activity = Arc::new(Activity::new());
        let mut downstream = Watched::new(downstream, activity.clone());
        let mut upstream = Watched::new(TokioIo::new(upstream), activity.clone());
        let ended = tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => match copied {
                Ok(_) => "closed",
                Err(err) => {
                    tracing::debug!(endpoint, %err, "tunnel broken");
                    "broken"
                }
            },
            () = activity.idle(self.idle_timeout) => "idle",
            () = self.close.cancelled() => "proxy closed",
        };
        let shutdown = async { tokio::join!(downstream.shutdown(), upstream.shutdown()) };
        let _ = tokio::time::timeout(SHUTDOWN_LIMIT, shutdown).await;
        metrics.rx_bytes.inc_by(downstream.read);
        metrics.tx_bytes.inc_by(upstream.read);
        tracing::debug!(
            endpoint,
            ended,
            rx_bytes = downstream.read,
            tx_bytes = upstream.read,
            "tunnel closed"
        );
    }
}

/// Takes a tunnel off the open gauge however its task ends.
struct OpenTunnel<'a>(&'a prometheus::IntGauge);

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When a tunnel last moved a byte, and whether one side has closed.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written either way.
    last: AtomicU64,
    half_closed: AtomicBool,
    /// Wakes the idle watch when a side closes (its window shrinks).
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            half_closed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    fn end_of_stream(&self) {
        if !self.half_closed.swap(true, Ordering::Relaxed) {
            self.changed.notify_one();
        }
    }

    /// Returns once nothing has moved for `idle` (for the linger, once a side closed).
    async fn idle(&self, idle: Duration) {
        loop {
            let window = if self.half_closed.load(Ordering::Relaxed) {
                idle.min(HALF_CLOSED_LINGER)
            } else {
                idle
            };
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = self.start + last + window;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = self.changed.notified() => {}
            }
        }
    }
}

/// One side of a tunnel: records activity and end of stream, and counts bytes read.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    read: u64,
}

impl<T> Watched<T> {
    fn new(io: T, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            read: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len() - before;
            if read > 0 {
                this.read += read as u64;
                this.activity.touch();
            } else if buf.remaining() > 0 {
                this.activity.end_of_stream();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled
            && written > 0
        {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    /// The idle watch ends exactly one idle window after the last byte.
    #[tokio::test(start_paused = true)]
    async fn idle_watch_counts_from_the_last_byte() {
        let activity = Arc::new(Activity::new());
        let (near, mut far) = duplex(64);
        let mut near = Watched::new(near, activity.clone());
        tokio::time::sleep(Duration::from_secs(40)).await;
        far.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        near.read_exact(&mut buf).await.unwrap();
        assert_eq!(near.read, 4);
        let start = Instant::now();
        activity.idle(Duration::from_secs(60)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(59_990) && waited <= Duration::from_secs(61),
            "{waited:?}"
        );
    }

    /// Once a side has closed, the other gets the linger, not the whole idle timeout.
    #[tokio::test(start_paused = true)]
    async fn a_closed_side_shortens_the_wait() {
        let activity = Arc::new(Activity::new());
        let (near, far) = duplex(64);
        let mut near = Watched::new(near, activity.clone());
        let watch = tokio::spawn({
            let activity = activity.clone();
            async move {
                let start = Instant::now();
                activity.idle(Duration::from_secs(60)).await;
                start.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(far);
        let mut buf = [0u8; 4];
        assert_eq!(near.read(&mut buf).await.unwrap(), 0);
        let waited = watch.await.unwrap();
        assert!(
            waited <= Duration::from_secs(1) + HALF_CLOSED_LINGER,
            "{waited:?}"
        );
    }
}
