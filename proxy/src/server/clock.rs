//! The per-connection clock: what a downstream connection is waiting for, and how long it
//! may wait for it.
//!
//! hyper has one timer for HTTP/1.1 (`header_read_timeout`, which also runs while a
//! keep-alive connection waits for its next request) and none for the step that tells
//! HTTP/1.1 from HTTP/2 or for an idle HTTP/2 connection. So the server keeps its own, as
//! Go's `http.Server` does:
//!
//! - **head**: a new connection, or one where the first byte of the next request arrived,
//!   has `header_read_timeout` to deliver a complete request head (the HTTP/2 preface
//!   counts as the head of an HTTP/2 connection). A silent socket or a partial preface is
//!   closed when it runs out.
//! - **idle**: a connection with no request open (every response ended) is closed after
//!   `idle_timeout` without a new request.
//! - **busy**: while a request is open nothing here runs; the request-body read timeout,
//!   the write-progress timeout and the endpoint's `timeout` bound that time.
//!
//! An idle HTTP/1.1 connection is also told to **park** once it has been idle for
//! [`PARK_AFTER`] with every byte of its last response written: the server then gives
//! hyper's buffers back and waits for the socket without them (see [`super`]). Each idle
//! wait parks at most once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};

/// How long an HTTP/1.1 connection waits idle before it parks. Parking and waking again
/// costs about 6.5k instructions (callgrind, one connection with a 50 ms park: 47.7k per
/// request when it paused 80 ms between requests, 41.3k at 30 ms pauses), so only a
/// connection sending fewer than five requests a second pays it. With freed pages purged
/// within half a second (`.cargo/config.toml`), the bench's memory scenario read 2.3-3.7 KiB
/// per idle connection with this park, about what a 50 ms park gave with a 1 s purge.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(200);

/// The timeouts of one listener's connections, and where their expiries are counted.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) header_read_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) read_timeout: Duration,
    pub(super) write_timeout: Duration,
    pub(super) expired: ExpiryCounters,
}

/// `go_gateway_downstream_timeouts_total{kind}`, resolved once per listener.
#[derive(Debug, Clone)]
pub(super) struct ExpiryCounters {
    pub(super) header: IntCounter,
    pub(super) idle: IntCounter,
    pub(super) body: IntCounter,
    pub(super) write: IntCounter,
}

/// Which wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// No complete request head (or HTTP/2 preface) within `header_read_timeout`.
    Header,
    /// No new request within `idle_timeout`.
    Idle,
}

/// What a [`ConnectionClock`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// An idle HTTP/1.1 connection may give back its buffers now.
    Park,
    /// A wait ran out: the connection is to be closed.
    Expired(Expiry),
}

/// Low bit of [`Activity::state`]: waiting for a request head.
const HEAD: u64 = 0;
/// Low bit of [`Activity::state`]: idle between requests.
const IDLE: u64 = 1;

/// What one connection is doing, shared by its IO (bytes arriving), its requests (opened
/// and ended, on any task) and its [`ConnectionClock`].
#[derive(Debug)]
pub(super) struct Activity {
    settings: Arc<Settings>,
    origin: Instant,
    /// Requests (HTTP/2: streams) whose response has not ended yet.
    open: AtomicUsize,
    /// Nanoseconds since `origin` when the current wait began, shifted left by one, with
    /// the kind of wait ([`HEAD`] or [`IDLE`]) in the low bit: one word, so a reader never
    /// sees the start of one wait with the kind of another.
    state: AtomicU64,
    /// The clock's task, woken when the last open request ends on another task.
    clock: AtomicWaker,
    /// Whether the connection speaks HTTP/2, whose streams end on their own tasks. An
    /// HTTP/1.1 response ends inside the connection's task, right before the clock is
    /// polled, so it needs no wake-up (which would cost a poll per request).
    http2: AtomicBool,
    /// Whether the last write to the client is blocked (its bytes not all taken): a
    /// connection in that state does not park, so nothing buffered is lost.
    write_blocked: AtomicBool,
}

impl Activity {
    /// A connection just accepted (or just past its TLS handshake): waiting for a head.
    pub(super) fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            origin: Instant::now(),
            open: AtomicUsize::new(0),
            state: AtomicU64::new(HEAD),
            clock: AtomicWaker::new(),
            http2: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }

    pub(super) fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// Recorded by the IO on every write's outcome; stored only when it changes.
    pub(super) fn set_write_blocked(&self, blocked: bool) {
        if self.write_blocked() != blocked {
            self.write_blocked.store(blocked, Ordering::Relaxed);
        }
    }

    pub(super) fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// A request head was read: the connection is busy until the returned guard is
    /// dropped, which the response body does when it ends.
    pub(super) fn request_opened(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenRequest(self.clone())
    }

    /// The connection was found to speak HTTP/2: its preface is its head, so it is now idle
    /// until a stream opens.
    pub(super) fn preface_read(&self) {
        self.http2.store(true, Ordering::Release);
        if self.open.load(Ordering::Acquire) == 0 {
            self.begin(IDLE);
        }
    }

    /// Bytes arrived on an HTTP/1.1 connection: when it was idle, they start the next
    /// request's head.
    pub(super) fn bytes_read(&self) {
        if self.open.load(Ordering::Acquire) == 0 && self.state.load(Ordering::Acquire) & 1 == IDLE
        {
            self.begin(HEAD);
        }
    }

    fn begin(&self, kind: u64) {
        let since = Instant::now().saturating_duration_since(self.origin);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX >> 1);
        self.state.store((nanos << 1) | kind, Ordering::Release);
    }

    fn request_ended(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.begin(IDLE);
            if self.http2.load(Ordering::Acquire) {
                self.clock.wake();
            }
        }
    }

    /// When the current wait runs out, and what that means; `None` while a request is
    /// open. With `park` (the idle wait that parked already, or [`NOT_PARKED`]), an idle
    /// wait that has not parked yet first comes to [`Wake::Park`].
    fn deadline(&self, park: Option<u64>) -> Option<(Instant, Wake)> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let state = self.state.load(Ordering::Acquire);
        let since = self.origin + Duration::from_nanos(state >> 1);
        Some(if state & 1 == HEAD {
            (
                since + self.settings.header_read_timeout,
                Wake::Expired(Expiry::Header),
            )
        } else if park.is_some_and(|parked| parked != state)
            && PARK_AFTER < self.settings.idle_timeout
            && !self.write_blocked()
        {
            (since + PARK_AFTER, Wake::Park)
        } else {
            (
                since + self.settings.idle_timeout,
                Wake::Expired(Expiry::Idle),
            )
        })
    }
}

/// [`ConnectionClock::parked`] before any park: no state word has all bits set.
const NOT_PARKED: u64 = u64::MAX;

/// Keeps a connection busy while it lives (see [`Activity::request_opened`]).
#[derive(Debug)]
pub(super) struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// Resolves when the connection's current wait runs out; never while a request is open.
/// Polled beside the connection in the same task, after it (so it sees what the
/// connection's last read changed).
pub(super) struct ConnectionClock {
    activity: Arc<Activity>,
    sleep: Pin<Box<Sleep>>,
    /// The idle wait that parked last ([`NOT_PARKED`] before the first).
    parked: u64,
}

impl ConnectionClock {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        let first = Instant::now() + activity.settings.header_read_timeout;
        Self {
            activity,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            parked: NOT_PARKED,
        }
    }

    /// Ready when the current wait runs out or, with `park`, when an idle connection may
    /// park (see [`PARK_AFTER`]).
    pub(super) fn poll_wake(&mut self, cx: &mut Context<'_>, park: bool) -> Poll<Wake> {
        self.activity.clock.register(cx.waker());
        let Some((deadline, wake)) = self.activity.deadline(park.then_some(self.parked)) else {
            return Poll::Pending;
        };
        // The timer is moved earlier at once but never later: a later deadline is set when
        // the earlier one fires. A connection serving request after request moves its
        // deadline at every request; not re-arming the timer each time saves about 0.1k
        // instructions per request (callgrind, tests/bench).
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
        }
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if self.sleep.deadline() >= deadline {
                return Poll::Ready(wake);
            }
            self.sleep.as_mut().reset(deadline);
        }
    }

    /// [`Self::poll_wake`] as a future.
    pub(super) async fn wake(&mut self, park: bool) -> Wake {
        std::future::poll_fn(|cx| self.poll_wake(cx, park)).await
    }

    /// The connection parked in its current idle wait: that wait does not park again.
    pub(super) fn parked(&mut self) {
        self.parked = self.activity.state.load(Ordering::Acquire);
    }
}

impl Future for ConnectionClock {
    type Output = Expiry;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expiry> {
        match self.poll_wake(cx, false) {
            Poll::Ready(Wake::Expired(expiry)) => Poll::Ready(expiry),
            // Not asked for: only `poll_wake(.., true)` parks.
            Poll::Ready(Wake::Park) | Poll::Pending => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection busy until it ends (or is dropped).
    pub(super) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _open: OpenRequest,
    }
}

impl<B> TrackedBody<B> {
    pub(super) fn new(inner: B, open: OpenRequest) -> Self {
        Self { inner, _open: open }
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Arc<Settings> {
        let counter = || IntCounter::new("c", "c").unwrap();
        Arc::new(Settings {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(15),
            expired: ExpiryCounters {
                header: counter(),
                idle: counter(),
                body: counter(),
                write: counter(),
            },
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_has_the_header_timeout_to_send_a_head() {
        let activity = Arc::new(Activity::new(settings()));
        let start = Instant::now();
        let expiry = ConnectionClock::new(activity).await;
        assert_eq!(expiry, Expiry::Header);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_request_stops_the_clock_and_its_end_starts_the_idle_wait() {
        let activity = Arc::new(Activity::new(settings()));
        activity.preface_read();
        let open = activity.request_opened();
        let clock = tokio::spawn(ConnectionClock::new(activity.clone()));
        // Far past both timeouts: nothing runs out while the request is open.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!clock.is_finished());
        let ended = Instant::now();
        // Dropped on another task, as an HTTP/2 stream's body is: the clock is woken.
        tokio::spawn(async move { drop(open) }).await.unwrap();
        assert_eq!(clock.await.unwrap(), Expiry::Idle);
        assert_eq!(ended.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_on_an_idle_connection_start_the_next_head() {
        let activity = Arc::new(Activity::new(settings()));
        drop(activity.request_opened());
        tokio::time::sleep(Duration::from_secs(30)).await;
        activity.bytes_read();
        let head = Instant::now();
        assert_eq!(ConnectionClock::new(activity).await, Expiry::Header);
        assert_eq!(head.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_parks_once_per_idle_wait_and_never_with_a_write_blocked() {
        let activity = Arc::new(Activity::new(settings()));
        let mut clock = ConnectionClock::new(activity.clone());
        drop(activity.request_opened());
        let idle = Instant::now();
        assert_eq!(clock.wake(true).await, Wake::Park);
        assert_eq!(idle.elapsed(), PARK_AFTER);
        clock.parked();
        // The same idle wait runs on to its timeout without parking again.
        assert_eq!(clock.wake(true).await, Wake::Expired(Expiry::Idle));
        assert_eq!(idle.elapsed(), Duration::from_secs(60));

        // The next idle wait parks again, unless the last write is still blocked.
        let activity = Arc::new(Activity::new(settings()));
        let mut clock = ConnectionClock::new(activity.clone());
        clock.parked();
        drop(activity.request_opened());
        activity.set_write_blocked(true);
        let idle = Instant::now();
        assert_eq!(clock.wake(true).await, Wake::Expired(Expiry::Idle));
        assert_eq!(idle.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_preface_is_a_head_and_makes_the_connection_idle() {
        let activity = Arc::new(Activity::new(settings()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.preface_read();
        // Later bytes (pings, settings) are not a new head on HTTP/2: the IO does not
        // report them, so only the idle wait runs.
        let preface = Instant::now();
        assert_eq!(ConnectionClock::new(activity).await, Expiry::Idle);
        assert_eq!(preface.elapsed(), Duration::from_secs(60));
    }
}
