//! `bbr`: adaptive load shedding after Kratos' BBR limiter (go-kratos/aegis), without CPU
//! sampling.
//!
//! The limiter keeps a rolling window of `buckets` time buckets. Each finished request adds
//! one pass and its response time to the current bucket. From the finished buckets of the
//! window it estimates the concurrency the upstream has shown it can carry: `maxPass`
//! (most requests finished in one bucket) × `minRT` (lowest average response time of a
//! bucket) ÷ bucket length — Little's law: the in-flight count that the best throughput at
//! the best latency needs.
//!
//! Kratos sheds only while CPU use is above 80%. Here the overload signal is latency
//! instead: the upstream counts as overloaded while the latest bucket's average response
//! time is at least `latencyRatio` × `minRT` (requests are queueing somewhere). While
//! overloaded, and for one second after the last shed request (aegis' cool-off), a request
//! is shed when the requests already in flight reach `max(minInFlight, capacity)`. When
//! latency is normal everything passes, however many requests are in flight, so the
//! estimate keeps learning what the upstream can do.
//!
//! A shed request is refused with [`Reason::Overloaded`] (`status`, 503 by default) and
//! counts in the proxy's `go_gateway_middleware_denied_total{reason="shed"}`.
//!
//! The hot path is atomics only: admission reads an estimate cached once per bucket and
//! increments the in-flight count; a finished request adds to its bucket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::support::{Denied, decode, duration, lenient_f64, lenient_u64, option_error};
use middleware::denials::DenialCounter;
use middleware::{Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection};

/// How long shedding goes on after the last shed request once latency is back to normal.
pub const COOL_OFF: Duration = Duration::from_secs(1);

/// Options of `bbr` (Kratos' middleware has none; window and buckets are aegis' defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BbrOptions {
    /// Length of the rolling window the estimate looks at. Default: `10s`.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Buckets the window is divided into. Default: 100 (so 100 ms buckets).
    #[serde(deserialize_with = "lenient_u64", alias = "bucket")]
    pub buckets: u64,
    /// In-flight requests always admitted, whatever the estimate. Default: 10.
    #[serde(deserialize_with = "lenient_u64", alias = "min_in_flight")]
    pub min_in_flight: u64,
    /// The upstream counts as overloaded while the latest bucket's average response time
    /// is at least this many times the window's minimum. Default: 2.
    #[serde(deserialize_with = "lenient_f64", alias = "latency_ratio")]
    pub latency_ratio: f64,
    /// Status of a shed request: 503 or 429. Default: 503.
    #[serde(deserialize_with = "lenient_u64")]
    pub status: u64,
}

impl Default for BbrOptions {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            buckets: 100,
            min_in_flight: 10,
            latency_ratio: 2.0,
            status: 503,
        }
    }
}

#[derive(Debug, Default)]
struct Bucket {
    /// 1 + the bucket number this slot holds (0: never used).
    epoch: AtomicU64,
    passed: AtomicU64,
    rt_sum_us: AtomicU64,
}

/// What the window says, computed once per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// `maxPass × minRT / bucket` (0 without data).
    pub capacity: u64,
    /// Whether the latest bucket's latency is inflated.
    pub overloaded: bool,
}

/// The shared state of one `bbr` instance.
#[derive(Debug)]
pub struct Shedder {
    ring: Box<[Bucket]>,
    bucket_us: u64,
    min_in_flight: u64,
    latency_ratio: f64,
    in_flight: AtomicI64,
    /// 1 + the bucket number the cached estimate was computed in.
    cached_for: AtomicU64,
    cached_capacity: AtomicU64,
    cached_overloaded: AtomicBool,
    /// 1 + the time of the last shed request, in µs since `epoch` (0: never).
    last_shed_us: AtomicU64,
    epoch: Instant,
    status: StatusCode,
    shed: Denied,
}

impl Shedder {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &BbrOptions, name: &str) -> Result<Self, BuildError> {
        if options.buckets == 0 || options.buckets > 10_000 {
            return Err(option_error(name, "buckets", "must be between 1 and 10000"));
        }
        let bucket_us =
            u64::try_from(options.window.as_micros()).unwrap_or(u64::MAX) / options.buckets;
        if bucket_us < 1_000 {
            return Err(option_error(
                name,
                "window",
                "each bucket (window / buckets) must be at least 1ms",
            ));
        }
        if options.latency_ratio < 1.0 {
            return Err(option_error(name, "latencyRatio", "must be at least 1"));
        }
        let status = match options.status {
            503 => StatusCode::SERVICE_UNAVAILABLE,
            429 => StatusCode::TOO_MANY_REQUESTS,
            other => {
                return Err(option_error(
                    name,
                    "status",
                    format!("{other} is not 503 or 429"),
                ));
            }
        };
        Ok(Self {
            ring: (0..options.buckets).map(|_| Bucket::default()).collect(),
            bucket_us,
            min_in_flight: options.min_in_flight.max(1),
            latency_ratio: options.latency_ratio,
            in_flight: AtomicI64::new(0),
            cached_for: AtomicU64::new(0),
            cached_capacity: AtomicU64::new(0),
            cached_overloaded: AtomicBool::new(false),
            last_shed_us: AtomicU64::new(0),
            epoch: Instant::now(),
            status,
            shed: Denied::default(),
        })
    }

    /// Counts shed requests in `counter`.
    pub fn with_shed_counter(mut self, counter: DenialCounter) -> Self {
        self.shed = Denied::new(counter);
        self
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The estimate for the current bucket.
    pub fn estimate(&self) -> Estimate {
        self.estimate_at(self.now_us() / self.bucket_us)
    }

    fn estimate_at(&self, bucket: u64) -> Estimate {
        if self.cached_for.load(Ordering::Acquire) == bucket + 1 {
            return Estimate {
                capacity: self.cached_capacity.load(Ordering::Acquire),
                overloaded: self.cached_overloaded.load(Ordering::Acquire),
            };
        }
        let window = self.ring.len() as u64;
        let (mut max_pass, mut min_rt) = (0u64, u64::MAX);
        let mut latest: Option<(u64, u64)> = None;
        for slot in self.ring.iter() {
            let Some(number) = slot.epoch.load(Ordering::Acquire).checked_sub(1) else {
                continue;
            };
            // Finished buckets still inside the window: (bucket - window, bucket).
            if number >= bucket || number + window <= bucket {
                continue;
            }
            let passed = slot.passed.load(Ordering::Acquire);
            if passed == 0 {
                continue;
            }
            let average_rt = slot.rt_sum_us.load(Ordering::Acquire) / passed;
            max_pass = max_pass.max(passed);
            min_rt = min_rt.min(average_rt);
            if latest.is_none_or(|(latest_number, _)| number > latest_number) {
                latest = Some((number, average_rt));
            }
        }
        let estimate = match latest {
            None => Estimate::default(),
            Some((_, latest_rt)) => {
                let min_rt = min_rt.max(1);
                Estimate {
                    capacity: (u128::from(max_pass) * u128::from(min_rt))
                        .div_ceil(u128::from(self.bucket_us)) as u64,
                    overloaded: latest_rt as f64 >= self.latency_ratio * min_rt as f64,
                }
            }
        };
        self.cached_capacity
            .store(estimate.capacity, Ordering::Release);
        self.cached_overloaded
            .store(estimate.overloaded, Ordering::Release);
        self.cached_for.store(bucket + 1, Ordering::Release);
        estimate
    }

    /// Admits a request (returns the ticket to finish it with) or sheds it.
    pub fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let now = self.now_us();
        let estimate = self.estimate_at(now / self.bucket_us);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let limit = estimate.capacity.max(self.min_in_flight);
        let over = before >= 0 && before as u64 >= limit;
        let cooling = match self.last_shed_us.load(Ordering::Acquire) {
            0 => false,
            last => now.saturating_sub(last - 1) <= COOL_OFF.as_micros() as u64,
        };
        if over && (estimate.overloaded || cooling) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            if estimate.overloaded {
                self.last_shed_us.store(now + 1, Ordering::Release);
            }
            self.shed.inc();
            return None;
        }
        Some(Ticket {
            shedder: self.clone(),
            start_us: now,
        })
    }

    fn record(&self, start_us: u64) {
        let now = self.now_us();
        let bucket = now / self.bucket_us;
        let slot = &self.ring[(bucket % self.ring.len() as u64) as usize];
        let current = slot.epoch.load(Ordering::Acquire);
        if current != bucket + 1
            && slot
                .epoch
                .compare_exchange(current, bucket + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A sample added by another thread between the swap and these stores is lost;
            // the estimate tolerates that.
            slot.passed.store(0, Ordering::Release);
            slot.rt_sum_us.store(0, Ordering::Release);
        }
        slot.passed.fetch_add(1, Ordering::AcqRel);
        slot.rt_sum_us
            .fetch_add(now.saturating_sub(start_us), Ordering::AcqRel);
    }
}

/// An admitted request. Finishing it records a pass and its response time; dropping it
/// unfinished (the request was cancelled) only releases the in-flight slot.
pub struct Ticket {
    shedder: Arc<Shedder>,
    start_us: u64,
}

impl Ticket {
    /// The request got its response (or failed): feed the estimate.
    pub fn finish(self) {
        self.shedder.record(self.start_us);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shedder.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Layer of `bbr`.
#[derive(Clone)]
pub struct BbrLayer {
    shedder: Arc<Shedder>,
}

impl BbrLayer {
    /// A layer sharing `shedder` between every service it builds.
    pub fn new(shedder: Shedder) -> Self {
        Self {
            shedder: Arc::new(shedder),
        }
    }
}

impl<S> Layer<S> for BbrLayer {
    type Service = Bbr<S>;

    fn layer(&self, inner: S) -> Bbr<S> {
        Bbr {
            shedder: self.shedder.clone(),
            inner,
        }
    }
}

/// The `bbr` service.
#[derive(Clone)]
pub struct Bbr<S> {
    shedder: Arc<Shedder>,
    inner: S,
}

impl<S> Service<Request<Body>> for Bbr<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self.shedder.admit() {
            Some(ticket) => ResponseFuture {
                state: State::Admitted {
                    future: self.inner.call(request),
                    ticket: Some(ticket),
                },
            },
            None => {
                let status = self.shedder.status;
                let message = status.canonical_reason().unwrap_or("overloaded");
                let response = Rejection::new(Reason::Overloaded, message)
                    .with_status(status)
                    .into_response();
                ResponseFuture {
                    state: State::Shed {
                        response: Some(response),
                    },
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Bbr`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Shed { response: Option<Response<Body>> },
        Admitted { #[pin] future: F, ticket: Option<Ticket> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Shed { response } => Poll::Ready(
                response
                    .take()
                    .ok_or_else(|| "bbr future polled after completion".into()),
            ),
            StateProj::Admitted { future, ticket } => {
                let result = ready!(future.poll(cx));
                if let Some(ticket) = ticket.take() {
                    ticket.finish();
                }
                Poll::Ready(result)
            }
        }
    }
}

/// Builds `bbr` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: BbrOptions = decode(config)?;
    let shed = ctx.denial_counter(&config.name, "shed");
    let shedder = Shedder::new(&options, &config.name)?.with_shed_counter(shed);
    Ok(Middleware::from_layer(&config.name, BbrLayer::new(shedder)))
}

#[cfg(test)]
mod tests {
    use futures_util::future::join_all;
    use tokio::sync::Semaphore;
    use tower::ServiceExt;

    use super::*;
    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};

    const MS: Duration = Duration::from_millis(1);

    fn shedder(min_in_flight: u64) -> Arc<Shedder> {
        let options = BbrOptions {
            window: Duration::from_secs(1),
            buckets: 10,
            min_in_flight,
            ..Default::default()
        };
        Arc::new(Shedder::new(&options, "bbr").expect("valid"))
    }

    /// In one 100 ms bucket: `rounds` rounds of `concurrent` requests taking `rt` each.
    async fn bucket_of_load(shedder: &Arc<Shedder>, concurrent: usize, rounds: u32, rt: Duration) {
        let start = Instant::now();
        for _ in 0..rounds {
            let tickets: Vec<_> = (0..concurrent)
                .map(|_| shedder.admit().expect("admitted"))
                .collect();
            tokio::time::advance(rt).await;
            tickets.into_iter().for_each(Ticket::finish);
        }
        tokio::time::advance((100 * MS).saturating_sub(start.elapsed())).await;
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_max_pass_times_min_rt() {
        let shedder = shedder(100);
        assert_eq!(shedder.estimate(), Estimate::default());
        // 10 at a time, 4 rounds of 20 ms: 40 passes per 100 ms at 20 ms → 8 in flight.
        bucket_of_load(&shedder, 10, 4, 20 * MS).await;
        bucket_of_load(&shedder, 10, 4, 20 * MS).await;
        assert_eq!(
            shedder.estimate(),
            Estimate {
                capacity: 8,
                overloaded: false
            }
        );
        // Slower responses: latency doubled → overloaded; the best bucket still counts.
        bucket_of_load(&shedder, 2, 2, 40 * MS).await;
        assert_eq!(
            shedder.estimate(),
            Estimate {
                capacity: 8,
                overloaded: true
            }
        );
        assert_eq!(shedder.in_flight(), 0);
        // The window forgets.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(shedder.estimate(), Estimate::default());
    }

    struct Setup {
        service: RoundTripper,
        denials: Arc<LocalDenials>,
    }

    /// `bbr` (1 s window, 10 buckets, minInFlight 2) in front of an upstream that serves
    /// each request in 20 ms, at most `slots` at a time (`None`: unlimited).
    fn setup(slots: Option<usize>) -> Setup {
        let denials = Arc::new(LocalDenials::default());
        let endpoint = Arc::new(EndpointInfo {
            path: "/busy".into(),
            ..Default::default()
        });
        let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
        let config = configs::Middleware {
            name: "bbr".into(),
            options: serde_json::json!({"window": "1s", "bucket": 10, "minInFlight": 2}),
            required: false,
        };
        let middleware = factory(&config, &ctx).expect("builds");
        let slots = Arc::new(Semaphore::new(slots.unwrap_or(Semaphore::MAX_PERMITS)));
        let upstream = RoundTripper::new(tower::service_fn(move |_request: Request<Body>| {
            let slots = slots.clone();
            async move {
                let _slot = slots.acquire().await?;
                tokio::time::sleep(20 * MS).await;
                Ok::<_, BoxError>(Response::new(full_body("ok")))
            }
        }));
        Setup {
            service: middleware.wrap(upstream),
            denials,
        }
    }

    /// Sends `n` requests at once; the statuses, each shed one checked to be a rejection.
    async fn burst(service: &RoundTripper, n: usize) -> Vec<u16> {
        let calls = (0..n).map(|_| service.clone().oneshot(Request::new(full_body(""))));
        join_all(calls)
            .await
            .into_iter()
            .map(|result| {
                let response = result.expect("response");
                let reason = Rejection::of(&response).map(|rejection| rejection.reason);
                let expected = (response.status() != StatusCode::OK).then_some(Reason::Overloaded);
                assert_eq!(reason, expected);
                response.status().as_u16()
            })
            .collect()
    }

    async fn warm_up(service: &RoundTripper) {
        for _ in 0..10 {
            let start = Instant::now();
            assert!(burst(service, 4).await.iter().all(|s| *s == 200));
            tokio::time::advance((100 * MS).saturating_sub(start.elapsed())).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_when_the_upstream_queues() {
        let Setup { service, denials } = setup(Some(4));
        warm_up(&service).await;
        // 40 at once against 4 slots: not known to be overloaded yet, so all are admitted;
        // they queue and latency climbs to 200 ms.
        assert!(burst(&service, 40).await.iter().all(|s| *s == 200));
        // Now overloaded: the upstream showed 20 passes per 100 ms at 20 ms → 4 in flight.
        let statuses = burst(&service, 20).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            4,
            "{statuses:?}"
        );
        assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 16);
        assert_eq!(denials.get("bbr", "/busy", "shed"), 16);
        // Past the cool-off and the window, light load passes again.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(burst(&service, 3).await.iter().all(|s| *s == 200));
    }

    #[tokio::test(start_paused = true)]
    async fn passes_everything_when_latency_stays_normal() {
        let Setup { service, denials } = setup(None);
        warm_up(&service).await;
        // Far more in flight than the estimate or the floor, but no queueing: no shedding.
        for _ in 0..5 {
            let start = Instant::now();
            assert!(burst(&service, 50).await.iter().all(|s| *s == 200));
            tokio::time::advance((100 * MS).saturating_sub(start.elapsed())).await;
        }
        assert_eq!(denials.get("bbr", "/busy", "shed"), 0);
    }

    #[test]
    fn options_are_checked() {
        let build = |options: serde_json::Value| {
            let config = configs::Middleware {
                name: "bbr".into(),
                options,
                required: false,
            };
            factory(&config, &BuildContext::new(Default::default()))
                .err()
                .map(|err| err.to_string())
                .unwrap_or_default()
        };
        assert!(
            build(serde_json::json!({"status": 500}))
                .contains("options.status: 500 is not 503 or 429")
        );
        assert!(build(serde_json::json!({"buckets": 0})).contains("options.buckets"));
        assert!(build(serde_json::json!({"window": 10})).contains("options.window: invalid type"));
        assert!(build(serde_json::json!({"latencyRatio": 0.5})).contains("options.latencyRatio"));
        assert!(
            build(serde_json::json!({"minInflight": 1})).contains("unknown field `minInflight`")
        );
        assert_eq!(
            build(serde_json::json!({"status": "429", "window": "5s", "min_in_flight": 3})),
            ""
        );
    }
}
