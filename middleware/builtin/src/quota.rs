//! `quota` (Apigee Edge's Quota): `allow` requests per `interval` × `timeUnit` (minute,
//! hour, day, week, month) for each API key, JWT claim, header value or client IP.
//!
//! - **Windows**: with `startTime`, calendar-aligned: windows follow one another from that
//!   instant (in `timeZone`; months are calendar months, a start on the 31st falls on the
//!   last day of shorter months), before it as after it. Without `startTime`, rolling: a
//!   key's window opens at its first request and the next one at the first request after it
//!   ended.
//! - **Responses**: every response carries `X-Quota-Limit`, `X-Quota-Remaining` and
//!   `X-Quota-Reset` (seconds until the window ends). Once `allow` requests are counted in
//!   the window, requests are refused with [`Reason::RateLimited`] (`429`, or `status`;
//!   gRPC endpoints get `RESOURCE_EXHAUSTED`) and `Retry-After`. Refusals count with reason
//!   `quota_exceeded`.
//! - **Counters**: local (a sharded map of at most 100,000 keys; when full, ended windows go
//!   first, then the window ending soonest), or in Redis with `redis` (or `--redis`): one
//!   script per request, windows computed by the gateway's clock, the same `failureMode` as
//!   `ratelimit`.
//! - **Keys**: `apikey` reads the `header` (default `X-API-Key`), then the `apikey` query
//!   parameter, and counts under its SHA-256 (keys are never stored); `claim` reads the claim
//!   from the bearer JWT's payload without checking it, so list `auth` (which does) first.
//!
//! Calendar arithmetic uses the `time` crate (already in the build); time zones are fixed
//! UTC offsets, so a zone with summer time is written as the offset to follow.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use base64::Engine;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::Digest;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};
use tower::{Layer, Service};

use crate::redis_store::{FailureMode, RedisStores, Shared, unavailable_response};
use crate::support::{Denied, decode, lenient_u64, opt_duration, option_error};
use middleware::{
    Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection, RequestOptions,
};

/// Keys remembered at most by the local counters.
const MAX_KEYS: usize = 100_000;

const SHARDS: usize = 16;

/// The unit of `interval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// Minutes.
    #[default]
    Minute,
    /// Hours.
    Hour,
    /// Days.
    Day,
    /// Weeks.
    Week,
    /// Calendar months.
    Month,
}

/// What requests are counted under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// The client's IP address (the TCP peer of the gateway).
    #[default]
    Ip,
    /// The value of the header named by `header`.
    Header,
    /// A claim of the bearer JWT, named by `claim`.
    Claim,
    /// The API key (header `header`, default `X-API-Key`, then query parameter `apikey`).
    Apikey,
}

/// Options of `quota`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct QuotaOptions {
    /// Requests allowed per window (required, > 0). Default: 0.
    #[serde(deserialize_with = "lenient_u64")]
    pub allow: u64,
    /// Length of a window in `timeUnit`s (> 0). Default: 1.
    #[serde(deserialize_with = "lenient_u64")]
    pub interval: u64,
    /// `minute`, `hour`, `day`, `week` or `month`. Default: `minute`.
    pub time_unit: TimeUnit,
    /// `YYYY-MM-DD HH:MM:SS` in `timeZone`: windows are aligned on it. Default: empty
    /// (rolling windows from each key's first request).
    pub start_time: String,
    /// The UTC offset of `startTime` and of calendar months: `UTC`, `+02:00`, `-05:30`.
    /// Default: `UTC`.
    pub time_zone: String,
    /// What requests are counted under: `ip`, `header`, `claim` or `apikey`. Default: `ip`.
    pub key: KeySource,
    /// The header holding the key with `key: header` (required then) or `key: apikey`
    /// (default `X-API-Key`). Default: empty.
    pub header: String,
    /// The JWT claim holding the key with `key: claim` (required then; `a.b` reads nested
    /// objects). Default: empty.
    pub claim: String,
    /// `redis://HOST:PORT[/DB]`: keep the counters there, shared by every gateway using
    /// it. Default: empty, meaning the gateway's `--redis`, or local counters without it.
    pub redis: String,
    /// While Redis is unreachable: `open` (count locally) or `closed` (503). Default: `open`.
    pub failure_mode: FailureMode,
    /// Bound on one Redis round trip. Default: `100ms`.
    #[serde(deserialize_with = "opt_duration")]
    pub redis_timeout: Option<Duration>,
    /// HTTP status once the quota is spent (400-599). Default: 429.
    #[serde(deserialize_with = "lenient_u64")]
    pub status: u64,
}

impl Default for QuotaOptions {
    fn default() -> Self {
        Self {
            allow: 0,
            interval: 1,
            time_unit: TimeUnit::Minute,
            start_time: String::new(),
            time_zone: String::new(),
            key: KeySource::Ip,
            header: String::new(),
            claim: String::new(),
            redis: String::new(),
            failure_mode: FailureMode::Open,
            redis_timeout: None,
            status: 429,
        }
    }
}

/// How windows are laid out.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    unit: TimeUnit,
    interval: u32,
    /// The aligned start, or `None` for rolling windows.
    start: Option<OffsetDateTime>,
    offset: UtcOffset,
}

impl Windows {
    /// The window an unseen key opens at `now_ms` (ms since the Unix epoch): its start and
    /// end.
    pub fn at(&self, now_ms: i64) -> (i64, i64) {
        let now = to_datetime(now_ms, self.offset);
        let Some(start) = self.start else {
            return (now_ms, to_ms(self.advance(now, 1)));
        };
        let start_ms = to_ms(start);
        let k = match self.unit {
            TimeUnit::Month => {
                let months = (now.year() as i64 * 12 + now.month() as i64)
                    - (start.year() as i64 * 12 + start.month() as i64);
                let mut k = months.div_euclid(i64::from(self.interval));
                if to_ms(self.advance(start, k)) > now_ms {
                    k -= 1;
                }
                k
            }
            _ => (now_ms - start_ms).div_euclid(self.fixed_ms()),
        };
        (
            to_ms(self.advance(start, k)),
            to_ms(self.advance(start, k + 1)),
        )
    }

    fn fixed_ms(&self) -> i64 {
        let unit: i64 = match self.unit {
            TimeUnit::Minute => 60_000,
            TimeUnit::Hour => 3_600_000,
            TimeUnit::Day => 86_400_000,
            TimeUnit::Week => 7 * 86_400_000,
            TimeUnit::Month => 31 * 86_400_000,
        };
        unit * i64::from(self.interval)
    }

    /// `from` moved by `windows` windows.
    fn advance(&self, from: OffsetDateTime, windows: i64) -> OffsetDateTime {
        match self.unit {
            TimeUnit::Month => add_months(from, windows * i64::from(self.interval)),
            _ => from + time::Duration::milliseconds(self.fixed_ms() * windows),
        }
    }
}

fn to_datetime(ms: i64, offset: UtcOffset) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .to_offset(offset)
}

fn to_ms(datetime: OffsetDateTime) -> i64 {
    i64::try_from(datetime.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// `from` plus `months` calendar months, the day clamped to the month's length.
fn add_months(from: OffsetDateTime, months: i64) -> OffsetDateTime {
    let total = from.year() as i64 * 12 + (from.month() as i64 - 1) + months;
    let year = i32::try_from(total.div_euclid(12)).unwrap_or(from.year());
    let month = Month::try_from((total.rem_euclid(12) + 1) as u8).unwrap_or(Month::January);
    let day = from.day().min(month.length(year));
    match Date::from_calendar_date(year, month, day) {
        Ok(date) => from.replace_date(date),
        Err(_) => from,
    }
}

/// Parses `UTC`, `Z`, `+HH:MM`, `-HH:MM` or `+HH`.
fn parse_offset(text: &str) -> Result<UtcOffset, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("utc") || text == "Z" {
        return Ok(UtcOffset::UTC);
    }
    let bad = || format!("{text:?} is not UTC or an offset like +02:00");
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(bad()),
    };
    let (hours, minutes) = rest.split_once(':').unwrap_or((rest, "0"));
    let hours: i8 = hours.parse().map_err(|_| bad())?;
    let minutes: i8 = minutes.parse().map_err(|_| bad())?;
    UtcOffset::from_hms(sign * hours, sign * minutes, 0).map_err(|_| bad())
}

/// Parses `YYYY-MM-DD HH:MM:SS` (or with a `T`) at `offset`.
fn parse_start(text: &str, offset: UtcOffset) -> Result<OffsetDateTime, String> {
    let bad = || format!("{text:?} is not YYYY-MM-DD HH:MM:SS");
    let (date, clock) = text
        .trim()
        .split_once([' ', 'T'])
        .unwrap_or((text.trim(), "00:00:00"));
    let numbers = |part: &str, sep: char| -> Result<Vec<i64>, String> {
        part.split(sep)
            .map(|n| n.parse::<i64>().map_err(|_| bad()))
            .collect()
    };
    let (ymd, hms) = (numbers(date, '-')?, numbers(clock, ':')?);
    let (&[year, month, day], &[hour, minute, second]) = (&ymd[..], &hms[..]) else {
        return Err(bad());
    };
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(bad)?;
    let date = Date::from_calendar_date(
        i32::try_from(year).map_err(|_| bad())?,
        month,
        u8::try_from(day).map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    let time = Time::from_hms(
        u8::try_from(hour).map_err(|_| bad())?,
        u8::try_from(minute).map_err(|_| bad())?,
        u8::try_from(second).map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    Ok(PrimitiveDateTime::new(date, time).assume_offset(offset))
}

/// Wall-clock time in ms since the Unix epoch: the system clock, or (tests) a fixed
/// instant moved by tokio's clock, so a paused clock crosses window boundaries.
#[derive(Debug, Clone, Copy)]
enum Clock {
    System,
    Tokio {
        origin_ms: i64,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    fn now_ms(&self) -> i64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| {
                    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
                }),
            Clock::Tokio { origin_ms, origin } => {
                origin_ms + i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX)
            }
        }
    }
}

/// Window end (ms) and count, by key.
type Shard = HashMap<Vec<u8>, (i64, u64)>;

/// Local counters: the window end and the count of each key.
struct Counters {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    per_shard: usize,
}

impl Counters {
    fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// The local twin of [`RedisStore::window_count`](crate::redis_store::RedisStore::window_count).
    fn count(&self, key: &[u8], now_ms: i64, end_ms: i64, allow: u64) -> (bool, u64, i64) {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut map = match shard.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !map.contains_key(key) && map.len() >= self.per_shard {
            map.retain(|_, (end, _)| *end > now_ms);
            if map.len() >= self.per_shard {
                let soonest = map
                    .iter()
                    .min_by_key(|(_, (end, _))| *end)
                    .map(|(key, _)| key.clone());
                if let Some(soonest) = soonest {
                    map.remove(&soonest);
                }
            }
        }
        let entry = map.entry(key.to_vec()).or_insert((end_ms, 0));
        if now_ms >= entry.0 {
            *entry = (end_ms, 0);
        }
        if entry.1 >= allow {
            return (false, entry.1, entry.0);
        }
        entry.1 += 1;
        (true, entry.1, entry.0)
    }
}

/// The shared state of one `quota` instance.
pub struct QuotaLimiter {
    allow: u64,
    windows: Windows,
    key: KeySource,
    header: Option<HeaderName>,
    claim: Vec<String>,
    status: StatusCode,
    clock: Clock,
    counters: Counters,
    shared: Option<Shared>,
    denied: Denied,
    unavailable: Denied,
}

/// What happens to one request.
enum Verdict {
    /// Go on; the response gets these quota headers.
    Pass(HeaderMap),
    /// Refused.
    Refuse(Response<Body>),
}

impl QuotaLimiter {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &QuotaOptions, name: &str) -> Result<Self, BuildError> {
        if options.allow == 0 {
            return Err(option_error(name, "allow", "must be greater than 0"));
        }
        let interval = u32::try_from(options.interval)
            .ok()
            .filter(|interval| *interval > 0)
            .ok_or_else(|| option_error(name, "interval", "must be between 1 and 4294967295"))?;
        let offset =
            parse_offset(&options.time_zone).map_err(|err| option_error(name, "timeZone", err))?;
        let start = if options.start_time.is_empty() {
            None
        } else {
            Some(
                parse_start(&options.start_time, offset)
                    .map_err(|err| option_error(name, "startTime", err))?,
            )
        };
        let status = u16::try_from(options.status)
            .ok()
            .filter(|status| (400..=599).contains(status))
            .and_then(|status| StatusCode::from_u16(status).ok())
            .ok_or_else(|| option_error(name, "status", "must be between 400 and 599"))?;
        let header_name = |text: &str| {
            HeaderName::try_from(text)
                .map_err(|_| option_error(name, "header", "not a valid header name"))
        };
        let header = match options.key {
            KeySource::Header if options.header.is_empty() => {
                return Err(option_error(name, "header", "required with key: header"));
            }
            KeySource::Header => Some(header_name(&options.header)?),
            KeySource::Apikey if options.header.is_empty() => {
                Some(HeaderName::from_static("x-api-key"))
            }
            KeySource::Apikey => Some(header_name(&options.header)?),
            _ if !options.header.is_empty() => {
                return Err(option_error(
                    name,
                    "header",
                    "only used with key: header or apikey",
                ));
            }
            _ => None,
        };
        match (options.key, options.claim.is_empty()) {
            (KeySource::Claim, true) => {
                return Err(option_error(name, "claim", "required with key: claim"));
            }
            (KeySource::Claim, false) | (_, true) => {}
            (_, false) => return Err(option_error(name, "claim", "only used with key: claim")),
        }
        Ok(Self {
            allow: options.allow,
            windows: Windows {
                unit: options.time_unit,
                interval,
                start,
                offset,
            },
            key: options.key,
            header,
            claim: options.claim.split('.').map(str::to_owned).collect(),
            status,
            clock: Clock::System,
            counters: Counters::new(MAX_KEYS),
            shared: None,
            denied: Denied::default(),
            unavailable: Denied::default(),
        })
    }

    /// Reads the wall clock as `origin_ms` moved by tokio's clock from now (tests that
    /// pause time cross window boundaries with it).
    pub fn with_tokio_clock(mut self, origin_ms: i64) -> Self {
        self.clock = Clock::Tokio {
            origin_ms,
            origin: tokio::time::Instant::now(),
        };
        self
    }

    /// What the request is counted under (`-` when it carries nothing to key on).
    fn key_of<B>(&self, request: &Request<B>) -> Vec<u8> {
        let found = match self.key {
            KeySource::Ip => request
                .extensions()
                .get::<RequestOptions>()
                .and_then(|options| options.client_addr)
                .map(|addr| format!("ip:{}", addr.ip()).into_bytes()),
            KeySource::Header => self
                .header
                .as_ref()
                .and_then(|name| request.headers().get(name))
                .map(|value| [b"h:", value.as_bytes()].concat()),
            KeySource::Apikey => self
                .header
                .as_ref()
                .and_then(|name| request.headers().get(name))
                .map(|value| value.as_bytes().to_vec())
                .or_else(|| {
                    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                        .find(|(name, _)| name == "apikey")
                        .map(|(_, value)| value.into_owned().into_bytes())
                })
                .map(|apikey| {
                    let digest = sha2::Sha256::digest(&apikey);
                    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                    format!("k:{hex}").into_bytes()
                }),
            KeySource::Claim => self
                .claim_of(request)
                .map(|claim| [b"c:", claim.as_bytes()].concat()),
        };
        found.unwrap_or_else(|| b"-".to_vec())
    }

    /// The configured claim of the bearer JWT (payload only; `auth` checks the token).
    fn claim_of<B>(&self, request: &Request<B>) -> Option<String> {
        let value = request
            .headers()
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))?;
        let payload = token.split('.').nth(1)?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
        let mut claim = &claims;
        for part in &self.claim {
            claim = claim.get(part)?;
        }
        match claim {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    fn verdict(&self, (counted, count, end_ms): (bool, u64, i64), now_ms: i64) -> Verdict {
        let reset = u64::try_from((end_ms - now_ms).max(0))
            .unwrap_or(0)
            .div_ceil(1000);
        let mut headers = HeaderMap::new();
        headers.insert("x-quota-limit", HeaderValue::from(self.allow));
        headers.insert(
            "x-quota-remaining",
            HeaderValue::from(if counted {
                self.allow.saturating_sub(count)
            } else {
                0
            }),
        );
        headers.insert("x-quota-reset", HeaderValue::from(reset));
        if counted {
            return Verdict::Pass(headers);
        }
        self.denied.inc();
        let mut rejection = Rejection::new(Reason::RateLimited, "Quota exceeded")
            .with_status(self.status)
            .with_header(http::header::RETRY_AFTER, HeaderValue::from(reset.max(1)));
        rejection.headers.extend(headers);
        Verdict::Refuse(rejection.into_response())
    }
}

/// Layer of `quota`.
#[derive(Clone)]
pub struct QuotaLayer {
    limiter: Arc<QuotaLimiter>,
}

impl QuotaLayer {
    /// A layer sharing `limiter` between every service it builds.
    pub fn new(limiter: QuotaLimiter) -> Self {
        Self {
            limiter: Arc::new(limiter),
        }
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> QuotaService<S> {
        QuotaService {
            limiter: self.limiter.clone(),
            inner,
        }
    }
}

/// The `quota` service.
#[derive(Clone)]
pub struct QuotaService<S> {
    limiter: Arc<QuotaLimiter>,
    inner: S,
}

type Admission = Pin<Box<dyn Future<Output = Verdict> + Send>>;

impl<S> Service<Request<Body>> for QuotaService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let limiter = &self.limiter;
        let key = limiter.key_of(&request);
        let now_ms = limiter.clock.now_ms();
        let (_, end_ms) = limiter.windows.at(now_ms);
        if limiter.shared.is_none() {
            let counted = limiter.counters.count(&key, now_ms, end_ms, limiter.allow);
            return match limiter.verdict(counted, now_ms) {
                Verdict::Pass(headers) => ResponseFuture {
                    state: State::Passed {
                        future: self.inner.call(request),
                        headers: Some(headers),
                    },
                },
                Verdict::Refuse(response) => ResponseFuture {
                    state: State::Refused {
                        response: Some(response),
                    },
                },
            };
        }
        let limiter = limiter.clone();
        let admission: Admission = Box::pin(async move {
            let Some(shared) = &limiter.shared else {
                return Verdict::Pass(HeaderMap::new());
            };
            let counted = match shared
                .store
                .window_count(
                    &shared.key(&key),
                    now_ms,
                    end_ms,
                    limiter.allow,
                    shared.timeout,
                )
                .await
            {
                Ok(counted) => counted,
                Err(_) if shared.failure_mode == FailureMode::Open => {
                    limiter.counters.count(&key, now_ms, end_ms, limiter.allow)
                }
                Err(_) => {
                    limiter.unavailable.inc();
                    return Verdict::Refuse(unavailable_response());
                }
            };
            limiter.verdict(counted, now_ms)
        });
        // The inner service that was polled ready goes into the future.
        let clone = self.inner.clone();
        ResponseFuture {
            state: State::Admitting {
                admission,
                request: Some(request),
                inner: Some(std::mem::replace(&mut self.inner, clone)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`QuotaService`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<S, F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Refused { response: Option<Response<Body>> },
        // Counting in Redis.
        Admitting { admission: Admission, request: Option<Request<Body>>, inner: Option<S> },
        Passed { #[pin] future: F, headers: Option<HeaderMap> },
    }
}

impl<S, F> Future for ResponseFuture<S, F>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = F>,
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Refused { response } => {
                    return Poll::Ready(
                        response
                            .take()
                            .ok_or_else(|| "quota future polled after completion".into()),
                    );
                }
                StateProj::Admitting {
                    admission,
                    request,
                    inner,
                } => {
                    let verdict = ready!(admission.as_mut().poll(cx));
                    let (Some(request), Some(mut inner)) = (request.take(), inner.take()) else {
                        return Poll::Ready(Err("quota future polled after completion".into()));
                    };
                    match verdict {
                        Verdict::Refuse(response) => return Poll::Ready(Ok(response)),
                        Verdict::Pass(headers) => {
                            let future = inner.call(request);
                            self.as_mut().project().state.set(State::Passed {
                                future,
                                headers: Some(headers),
                            });
                        }
                    }
                }
                StateProj::Passed { future, headers } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(headers) = headers.take() {
                        response.headers_mut().extend(headers);
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

/// The factory of `quota`; Redis-backed instances take their store from `stores`.
pub fn factory(
    stores: Arc<RedisStores>,
) -> impl Fn(&configs::Middleware, &BuildContext) -> Result<Middleware, BuildError> + Send + Sync {
    move |config, ctx| build(config, ctx, &stores, None)
}

/// Builds `quota` from its config entry; `clock_origin_ms` (tests) reads the wall clock
/// through tokio's clock from that instant.
pub fn build(
    config: &configs::Middleware,
    ctx: &BuildContext,
    stores: &RedisStores,
    clock_origin_ms: Option<i64>,
) -> Result<Middleware, BuildError> {
    let options: QuotaOptions = decode(config)?;
    let mut limiter = QuotaLimiter::new(&options, &config.name)?;
    if let Some(origin_ms) = clock_origin_ms {
        limiter = limiter.with_tokio_clock(origin_ms);
    }
    limiter.shared = Shared::build(
        stores,
        "quota",
        config,
        ctx,
        &options.redis,
        options.failure_mode,
        options.redis_timeout,
    )?;
    limiter.denied = Denied::new(ctx.denial_counter(&config.name, "quota_exceeded"));
    limiter.unavailable = Denied::new(ctx.denial_counter(&config.name, "redis_unavailable"));
    Ok(Middleware::from_layer(
        &config.name,
        QuotaLayer::new(limiter),
    ))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};
    use tower::ServiceExt;

    use super::*;

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "quota".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> (BuildContext, Arc<LocalDenials>) {
        let endpoint = EndpointInfo {
            path: "/metered".into(),
            ..Default::default()
        };
        let denials = Arc::new(LocalDenials::default());
        let ctx = BuildContext::new(Arc::new(endpoint)).with_denials(denials.clone());
        (ctx, denials)
    }

    fn utc(text: &str) -> i64 {
        to_ms(parse_start(text, UtcOffset::UTC).expect("a time"))
    }

    /// The quota on a clock that starts at `origin` (UTC) and moves with tokio's.
    fn service(options: serde_json::Value, origin: &str) -> (RoundTripper, Arc<LocalDenials>) {
        let (ctx, denials) = ctx();
        let ok = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(full_body("ok")))
        }));
        let middleware = build(
            &entry(options),
            &ctx,
            &RedisStores::default(),
            Some(utc(origin)),
        )
        .expect("builds");
        (middleware.wrap(ok), denials)
    }

    fn request(headers: &[(&str, &str)], uri: &str) -> Request<Body> {
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(full_body("")).expect("request");
        let addr = SocketAddr::from(([10, 0, 0, 1], 4000));
        request
            .extensions_mut()
            .insert(RequestOptions::new(Default::default(), Some(addr)));
        request
    }

    /// Status and the three quota headers.
    async fn send(service: &RoundTripper, request: Request<Body>) -> (u16, String) {
        let response = service.clone().oneshot(request).await.expect("response");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let text = format!(
            "limit={} remaining={} reset={}",
            header("x-quota-limit"),
            header("x-quota-remaining"),
            header("x-quota-reset")
        );
        (response.status().as_u16(), text)
    }

    #[tokio::test(start_paused = true)]
    async fn calendar_windows_reset_at_the_boundary() {
        let (service, denials) = service(
            serde_json::json!({"allow": 3, "timeUnit": "hour", "startTime": "2026-01-01 00:00:00"}),
            "2026-03-01 10:59:58",
        );
        let plain = || request(&[], "/");
        assert_eq!(
            send(&service, plain()).await,
            (200, "limit=3 remaining=2 reset=2".into())
        );
        assert_eq!(
            send(&service, plain()).await.1,
            "limit=3 remaining=1 reset=2"
        );
        assert_eq!(
            send(&service, plain()).await.1,
            "limit=3 remaining=0 reset=2"
        );
        let refused = service.clone().oneshot(plain()).await.expect("response");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["retry-after"], "2");
        assert_eq!(refused.headers()["x-quota-remaining"], "0");
        assert_eq!(
            Rejection::of(&refused).map(|rejection| rejection.reason),
            Some(Reason::RateLimited)
        );
        // One second before the boundary: still spent.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(
            send(&service, plain()).await,
            (429, "limit=3 remaining=0 reset=1".into())
        );
        // 11:00:00: a new window, a full hour long.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            send(&service, plain()).await,
            (200, "limit=3 remaining=2 reset=3600".into())
        );
        assert_eq!(denials.get("quota", "/metered", "quota_exceeded"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rolling_windows_start_at_the_first_request_per_key() {
        let (service, _) = service(
            serde_json::json!({"allow": 2, "interval": 2, "key": "header", "header": "x-client", "status": 403}),
            "2026-03-01 10:59:58",
        );
        let from = |client: &'static str| request(&[("x-client", client)], "/");
        assert_eq!(
            send(&service, from("a")).await,
            (200, "limit=2 remaining=1 reset=120".into())
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            send(&service, from("a")).await,
            (200, "limit=2 remaining=0 reset=60".into())
        );
        // Another client's window starts now.
        assert_eq!(
            send(&service, from("b")).await,
            (200, "limit=2 remaining=1 reset=120".into())
        );
        assert_eq!(
            send(&service, from("a")).await,
            (403, "limit=2 remaining=0 reset=60".into())
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            send(&service, from("a")).await,
            (200, "limit=2 remaining=1 reset=120".into())
        );
        assert_eq!(
            send(&service, from("b")).await,
            (200, "limit=2 remaining=0 reset=60".into())
        );
    }

    #[test]
    fn month_windows_follow_the_calendar_in_the_time_zone() {
        let offset = parse_offset("+02:00").expect("offset");
        let windows = Windows {
            unit: TimeUnit::Month,
            interval: 1,
            start: Some(parse_start("2026-01-31 00:00:00", offset).expect("start")),
            offset,
        };
        let at = |text: &str| to_ms(parse_start(text, offset).expect("time"));
        // February has no 31st: its window starts on the 28th, March's on the 31st again.
        assert_eq!(
            windows.at(at("2026-02-27 23:59:59")),
            (at("2026-01-31 00:00:00"), at("2026-02-28 00:00:00"))
        );
        assert_eq!(
            windows.at(at("2026-02-28 00:00:00")),
            (at("2026-02-28 00:00:00"), at("2026-03-31 00:00:00"))
        );
        // Before the start, windows run backwards from it.
        assert_eq!(
            windows.at(at("2025-12-15 12:00:00")),
            (at("2025-11-30 00:00:00"), at("2025-12-31 00:00:00"))
        );
        // In UTC the same instant is two hours earlier.
        assert_eq!(at("2026-02-28 00:00:00"), utc("2026-02-27 22:00:00"));
        let weekly = Windows {
            unit: TimeUnit::Week,
            interval: 2,
            start: Some(parse_start("2026-01-05 00:00:00", UtcOffset::UTC).expect("start")),
            offset: UtcOffset::UTC,
        };
        assert_eq!(
            weekly.at(utc("2026-01-20 08:00:00")),
            (utc("2026-01-19 00:00:00"), utc("2026-02-02 00:00:00"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn api_keys_and_claims_are_keys() {
        let (by_key, _) = service(
            serde_json::json!({"allow": 1, "timeUnit": "day", "key": "apikey"}),
            "2026-03-01 10:00:00",
        );
        assert_eq!(
            send(&by_key, request(&[("x-api-key", "k1")], "/")).await.0,
            200
        );
        // The same key in the query parameter is the same key.
        assert_eq!(send(&by_key, request(&[], "/?apikey=k1")).await.0, 429);
        assert_eq!(send(&by_key, request(&[], "/?apikey=k2")).await.0, 200);

        let (by_claim, _) = service(
            serde_json::json!({"allow": 1, "key": "claim", "claim": "org.id"}),
            "2026-03-01 10:00:00",
        );
        let token = |org: &str| {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!("{{\"sub\":\"u\",\"org\":{{\"id\":\"{org}\"}}}}"));
            format!("Bearer e30.{payload}.sig")
        };
        let with = |org: &str| request(&[("authorization", &token(org))], "/");
        assert_eq!(send(&by_claim, with("acme")).await.0, 200);
        assert_eq!(send(&by_claim, with("acme")).await.0, 429);
        assert_eq!(send(&by_claim, with("initech")).await.0, 200);
    }

    #[test]
    fn option_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({}),
                "options.allow: must be greater than 0",
            ),
            (
                serde_json::json!({"allow": 1, "interval": 0}),
                "options.interval: must be",
            ),
            (
                serde_json::json!({"allow": 1, "timeUnit": "year"}),
                "options.timeUnit: unknown variant `year`",
            ),
            (
                serde_json::json!({"allow": 1, "startTime": "soon"}),
                "options.startTime: \"soon\" is not",
            ),
            (
                serde_json::json!({"allow": 1, "startTime": "2026-02-30 00:00:00"}),
                "options.startTime: ",
            ),
            (
                serde_json::json!({"allow": 1, "timeZone": "Europe/Paris"}),
                "options.timeZone: ",
            ),
            (
                serde_json::json!({"allow": 1, "key": "header"}),
                "options.header: required",
            ),
            (
                serde_json::json!({"allow": 1, "key": "claim"}),
                "options.claim: required",
            ),
            (
                serde_json::json!({"allow": 1, "claim": "sub"}),
                "options.claim: only used",
            ),
            (
                serde_json::json!({"allow": 1, "status": 200}),
                "options.status: must be between 400 and 599",
            ),
        ];
        for (options, expected) in cases {
            let err = build(
                &entry(options.clone()),
                &ctx().0,
                &RedisStores::default(),
                None,
            )
            .err()
            .expect("bad options");
            let text = err.to_string();
            assert!(text.contains(expected), "{options}: {text}");
        }
    }
}
