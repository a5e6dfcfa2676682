//! Redis as the shared store of `ratelimit`, `quota` and `spikearrest` counters, so a limit
//! holds across every gateway using the same Redis.
//!
//! - One [`RedisStore`] per DSN per gateway: the [`RedisStores`] that the factories of one
//!   registry share hand it out, and it lives while a middleware holds it (so a reload keeps
//!   the connection). It holds one multiplexed connection: concurrent requests are
//!   pipelined on it.
//! - A decision is one server-side Lua script ([`GCRA`](RedisStore::gcra) for `ratelimit`
//!   and `spikearrest`, a [window counter](RedisStore::window_count) for `quota`): one round
//!   trip, bounded by the middleware's `redisTimeout`.
//! - State: connecting, up, down. The first request waits for the first connection at most
//!   `redisTimeout`. A failed round trip (I/O error, dropped connection, timeout) marks the
//!   store down: from then on no request waits for Redis, each is decided at once by its
//!   middleware's [`FailureMode`], and one background task reconnects with the gateway's
//!   jittered backoff (50 ms doubling to 1 s) until a `PING` answers. Each switch is logged
//!   once (`redis unreachable` at WARN, `redis reachable` at INFO) and shown in
//!   `go_gateway_middleware_store_up{store="redis",target}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, RedisError, Script};
use serde::Deserialize;
use tokio::sync::Notify;

use middleware::BuildContext;
use middleware::denials::GaugeHandle;

use crate::ratelimit::bucket::Decision;

/// Default bound on one Redis round trip (`redisTimeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// Bound on connecting (and the first `PING`) in the background task.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a Redis-backed middleware does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Decide with this gateway's own (local) counters.
    #[default]
    Open,
    /// Refuse with `503 Service Unavailable`.
    Closed,
}

/// Redis could not answer this time (down, timed out, or an error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("redis unavailable")]
pub struct Unavailable;

/// Checks a DSN: `redis://[:PASSWORD@]HOST:PORT[/DB]`.
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    parse(dsn).map(drop)
}

fn parse(dsn: &str) -> Result<(Client, String), String> {
    if !dsn.starts_with("redis://") {
        return Err(format!("{dsn:?} is not redis://HOST:PORT[/DB]"));
    }
    let client = Client::open(dsn).map_err(|err| format!("{dsn:?}: {err}"))?;
    let info = client.get_connection_info();
    let ConnectionAddr::Tcp(host, port) = info.addr() else {
        return Err(format!("{dsn:?} is not redis://HOST:PORT[/DB]"));
    };
    let target = format!("{host}:{port}/{}", info.redis_settings().db());
    Ok((client, target))
}

/// The Redis stores of one gateway, by DSN; built by [`crate::register_all`] and shared by
/// the factories it registers.
#[derive(Default)]
pub struct RedisStores {
    stores: Mutex<HashMap<String, Weak<RedisStore>>>,
}

impl RedisStores {
    /// The store for `dsn`, reused while any middleware holds it.
    pub fn get(&self, dsn: &str, ctx: &BuildContext) -> Result<Arc<RedisStore>, String> {
        let mut stores = match self.stores.lock() {
            Ok(stores) => stores,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(store) = stores.get(dsn).and_then(Weak::upgrade) {
            return Ok(store);
        }
        stores.retain(|_, store| store.strong_count() > 0);
        let (client, target) = parse(dsn)?;
        let gauge = ctx.denials.store_up("redis", &target);
        gauge.set(0);
        let store = Arc::new(RedisStore {
            client,
            target,
            state: ArcSwap::from_pointee(State::Connecting),
            changed: Notify::new(),
            reconnecting: AtomicBool::new(false),
            gauge,
        });
        stores.insert(dsn.to_owned(), Arc::downgrade(&store));
        Ok(store)
    }
}

enum State {
    /// Not connected yet (no failure seen).
    Connecting,
    Up(MultiplexedConnection),
    Down,
}

/// One Redis, one multiplexed connection, and whether it is reachable.
pub struct RedisStore {
    client: Client,
    /// `HOST:PORT/DB`, for logs and the gauge (never the password).
    target: String,
    state: ArcSwap<State>,
    changed: Notify,
    reconnecting: AtomicBool,
    gauge: GaugeHandle,
}

impl RedisStore {
    /// A store for `dsn` outside any registry (tests, embedders).
    pub fn open(dsn: &str, ctx: &BuildContext) -> Result<Arc<RedisStore>, String> {
        RedisStores::default().get(dsn, ctx)
    }

    /// `HOST:PORT/DB`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the last round trip (or connection attempt) succeeded.
    pub fn is_up(&self) -> bool {
        matches!(**self.state.load(), State::Up(_))
    }

    /// GCRA on the server's clock: takes one slot of `interval` from the bucket at `key`,
    /// which holds `burst` slots. The same arithmetic as the local
    /// [`Bucket`](crate::ratelimit::bucket::Bucket), in microseconds.
    pub async fn gcra(
        self: &Arc<Self>,
        key: &[u8],
        interval: Duration,
        burst: u64,
        timeout: Duration,
    ) -> Result<Decision, Unavailable> {
        static GCRA: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
            Script::new(
                r"
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local ahead = tat + interval - now
if ahead > tolerance then
  return {0, 0, tat - now, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%d', tat + interval), 'PX', math.ceil(ahead / 1000) + 1000)
return {1, math.floor((tolerance - ahead) / interval), ahead, 0}
",
            )
        });
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut invocation = GCRA.prepare_invoke();
        invocation.key(key).arg(interval_us).arg(burst.max(1));
        let reply: Vec<i64> = self
            .run(timeout, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let [allowed, remaining, reset, retry_after] = reply[..] else {
            return Err(Unavailable);
        };
        let micros = |value: i64| Duration::from_micros(u64::try_from(value).unwrap_or(0));
        Ok(Decision {
            allowed: allowed == 1,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset: micros(reset),
            retry_after: micros(retry_after),
        })
    }

    /// A counter of requests in the window ending at `end_ms` (milliseconds since the Unix
    /// epoch): when `key` holds no window, or its window ended by `now_ms`, a new one
    /// starting now and ending at `end_ms` is opened. Counts one request unless `allow` are
    /// already counted. Returns whether it was counted, the count, and the window's end.
    pub async fn window_count(
        self: &Arc<Self>,
        key: &[u8],
        now_ms: i64,
        end_ms: i64,
        allow: u64,
        timeout: Duration,
    ) -> Result<(bool, u64, i64), Unavailable> {
        static WINDOW: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
            Script::new(
                r"
local now = tonumber(ARGV[1])
local saved = redis.call('HMGET', KEYS[1], 'e', 'c')
local e = tonumber(saved[1])
local c = 0
if e and now < e then
  c = tonumber(saved[2]) or 0
else
  e = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'c', 0, 'e', string.format('%d', e))
  redis.call('PEXPIREAT', KEYS[1], string.format('%d', e + 60000))
end
if c >= tonumber(ARGV[3]) then return {0, c, e} end
c = redis.call('HINCRBY', KEYS[1], 'c', 1)
return {1, c, e}
",
            )
        });
        let mut invocation = WINDOW.prepare_invoke();
        invocation.key(key).arg(now_ms).arg(end_ms).arg(allow);
        let reply: Vec<i64> = self
            .run(timeout, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let [counted, count, end] = reply[..] else {
            return Err(Unavailable);
        };
        Ok((counted == 1, u64::try_from(count).unwrap_or(0), end))
    }

    /// Runs one round trip on the current connection, bounded by `timeout`; a failure that
    /// means Redis is gone marks the store down.
    async fn run<T, F, Fut>(self: &Arc<Self>, timeout: Duration, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let state = self.current(timeout).await?;
        let State::Up(conn) = &*state else {
            return Err(Unavailable);
        };
        match tokio::time::timeout(timeout, call(conn.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) if is_outage(&err) => {
                self.mark_down(&state, &err.to_string());
                Err(Unavailable)
            }
            Ok(Err(err)) => {
                tracing::debug!(target = %self.target, %err, "redis error reply");
                Err(Unavailable)
            }
            Err(_) => {
                self.mark_down(&state, "timed out");
                Err(Unavailable)
            }
        }
    }

    /// The state to use now; on first use, starts connecting and waits at most `timeout`.
    async fn current(self: &Arc<Self>, timeout: Duration) -> Result<Arc<State>, Unavailable> {
        let state = self.state.load_full();
        match *state {
            State::Up(_) => Ok(state),
            State::Down => Err(Unavailable),
            State::Connecting => {
                let changed = self.changed.notified();
                self.reconnect();
                let state = self.state.load_full();
                if let State::Connecting = *state {
                    let _ = tokio::time::timeout(timeout, changed).await;
                    return Ok(self.state.load_full());
                }
                Ok(state)
            }
        }
    }

    /// Marks the store down if `seen` is still the current state (a late failure of an old
    /// connection does not take down a new one), and starts reconnecting.
    fn mark_down(self: &Arc<Self>, seen: &Arc<State>, why: &str) {
        let previous = self.state.compare_and_swap(seen, Arc::new(State::Down));
        if Arc::ptr_eq(&previous, seen) {
            self.gauge.set(0);
            tracing::warn!(
                target = %self.target,
                error = why,
                "redis unreachable; Redis-backed limits follow their failureMode until it returns"
            );
            self.reconnect();
        }
    }

    /// Starts the reconnecting task unless it runs already. It ends once connected, or when
    /// the store is dropped.
    fn reconnect(self: &Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reconnecting.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        let client = self.client.clone();
        runtime.spawn(async move {
            let mut backoff =
                discovery::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                let attempt = connect(&client).await;
                let Some(store) = weak.upgrade() else { return };
                match attempt {
                    Ok(conn) => {
                        let was_down = matches!(**store.state.load(), State::Down);
                        store.state.store(Arc::new(State::Up(conn)));
                        store.reconnecting.store(false, Ordering::Release);
                        store.gauge.set(1);
                        store.changed.notify_waiters();
                        if was_down {
                            tracing::info!(target = %store.target, "redis reachable again");
                        } else {
                            tracing::info!(target = %store.target, "redis connected");
                        }
                        return;
                    }
                    Err(err) => {
                        if matches!(**store.state.load(), State::Connecting) {
                            store.state.store(Arc::new(State::Down));
                            store.changed.notify_waiters();
                            tracing::warn!(
                                target = %store.target,
                                error = %err,
                                "redis unreachable; Redis-backed limits follow their failureMode until it returns"
                            );
                        }
                    }
                }
                drop(store);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
    }
}

async fn connect(client: &Client) -> Result<MultiplexedConnection, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CONNECT_TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("PING").query_async::<()>(&mut conn).await?;
    Ok(conn)
}

/// Whether an error means the connection is gone, not that the server answered an error.
fn is_outage(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

/// What a Redis-backed middleware holds: the store, its key prefix, its timeout and what to
/// do without Redis.
pub struct Shared {
    /// The store.
    pub store: Arc<RedisStore>,
    /// The prefix of every key of this middleware (see [`key_prefix`]).
    pub prefix: Vec<u8>,
    /// Bound on one round trip.
    pub timeout: Duration,
    /// What to do while Redis is unreachable.
    pub failure_mode: FailureMode,
}

impl Shared {
    /// The store of the middleware entry `config` of kind `kind` when it (or `--redis`) names
    /// one: its own `redis` option wins over the gateway-wide `ctx.redis`.
    pub fn build(
        stores: &RedisStores,
        kind: &str,
        config: &configs::Middleware,
        ctx: &BuildContext,
        redis: &str,
        failure_mode: FailureMode,
        timeout: Option<Duration>,
    ) -> Result<Option<Shared>, middleware::BuildError> {
        let dsn = if redis.is_empty() {
            match &ctx.redis {
                Some(dsn) => dsn,
                None => return Ok(None),
            }
        } else {
            redis
        };
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(crate::support::option_error(
                &config.name,
                "redisTimeout",
                "must be greater than 0",
            ));
        }
        let store = stores
            .get(dsn, ctx)
            .map_err(|err| crate::support::option_error(&config.name, "redis", err))?;
        Ok(Some(Shared {
            store,
            prefix: key_prefix(kind, config, &ctx.endpoint),
            timeout,
            failure_mode,
        }))
    }

    /// The full key: the prefix, then `suffix`.
    pub fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + suffix.len());
        key.extend_from_slice(&self.prefix);
        key.extend_from_slice(suffix);
        key
    }
}

/// The refusal while Redis is unreachable and `failureMode: closed`: `503`, or gRPC
/// `UNAVAILABLE`.
pub fn unavailable_response() -> http::Response<middleware::Body> {
    middleware::Rejection::new(middleware::Reason::Overloaded, "limit store unavailable")
        .into_response()
}

/// A Redis key for a middleware's counter: `gateway:{middleware}:{endpoint}:{digest}:{key}`.
/// The digest covers the middleware's options other than where Redis is and what to do
/// without it, so gateways with the same config share counters, and two entries with
/// different limits on one endpoint do not.
pub fn key_prefix(
    kind: &str,
    config: &configs::Middleware,
    endpoint: &middleware::EndpointInfo,
) -> Vec<u8> {
    use sha2::Digest;
    let mut options = config.options.clone();
    if let serde_json::Value::Object(map) = &mut options {
        for field in ["redis", "failureMode", "redisTimeout", "@type"] {
            map.remove(field);
        }
    }
    let digest = sha2::Sha256::digest(options.to_string().as_bytes());
    let method = if endpoint.method.is_empty() {
        "*"
    } else {
        &endpoint.method
    };
    let mut prefix = format!(
        "gateway:{kind}:{method} {}{}:{:02x}{:02x}{:02x}{:02x}:",
        endpoint.host, endpoint.path, digest[0], digest[1], digest[2], digest[3]
    )
    .into_bytes();
    prefix.shrink_to_fit();
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsns() {
        assert!(check_dsn("redis://127.0.0.1:6379").is_ok());
        assert!(check_dsn("redis://:secret@cache.internal:6380/2").is_ok());
        assert!(check_dsn("127.0.0.1:6379").is_err());
        assert!(check_dsn("rediss://127.0.0.1:6379").is_err());
        assert!(check_dsn("redis://127.0.0.1:6379/x").is_err());
        let (_, target) = parse("redis://:secret@cache.internal:6380/2").expect("parses");
        assert_eq!(target, "cache.internal:6380/2");
    }

    #[test]
    fn key_prefixes_ignore_where_redis_is() {
        let endpoint = middleware::EndpointInfo {
            path: "/api/*".into(),
            ..Default::default()
        };
        let entry = |options: serde_json::Value| configs::Middleware {
            name: "ratelimit".into(),
            options,
            required: false,
        };
        let a = key_prefix(
            "ratelimit",
            &entry(serde_json::json!({"rate": 10, "redis": "redis://a:1"})),
            &endpoint,
        );
        let b = key_prefix(
            "ratelimit",
            &entry(serde_json::json!({"rate": 10, "failureMode": "closed"})),
            &endpoint,
        );
        let c = key_prefix(
            "ratelimit",
            &entry(serde_json::json!({"rate": 20})),
            &endpoint,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with(b"gateway:ratelimit:* /api/*:"));
    }
}
