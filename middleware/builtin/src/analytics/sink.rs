//! The bounded queue of records and the task that ships them in batches.
//!
//! The request path only calls [`Sink::push`]: a `try_send` into a bounded tokio channel,
//! so a request never waits for analytics; a full queue drops the record and counts it.
//! One task per sink takes records off the queue in batches of `batchSize` (or what
//! arrived within `flushInterval` of a batch's first record), writes them as JSON, and
//! POSTs them to the collector or appends them to the file. A batch the collector does
//! not accept (down, slow past `timeout`, non-2xx answer) or the file refuses is dropped
//! and counted: memory stays bounded by the queue plus the batch in hand. When the last
//! middleware holding the sink goes (config replaced), the task ships what is left and
//! ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Method, Request, Uri};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tower::ServiceExt;

use super::record::Record;
use middleware::full_body;
use middleware::hooks::collect_limited;

/// Where batches go.
pub(super) enum Destination {
    /// POSTed as a JSON array.
    Collector {
        /// The collector's client (the gateway's upstream client stack).
        client: client::Client,
        /// Where to POST.
        url: Uri,
        /// Limit on one POST.
        timeout: Duration,
    },
    /// Appended as JSON lines.
    File(std::path::PathBuf),
}

impl Destination {
    fn describe(&self) -> String {
        match self {
            Destination::Collector { url, .. } => url.to_string(),
            Destination::File(path) => path.display().to_string(),
        }
    }
}

/// Counts of one sink, for tests and debugging.
#[derive(Debug, Default)]
struct SinkStats {
    queued_max: AtomicUsize,
    dropped: AtomicU64,
    shipped: AtomicU64,
}

/// A snapshot of a sink's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSnapshot {
    /// The collector URL or the file path.
    pub destination: String,
    /// The queue's bound (`queueSize`).
    pub queue_size: usize,
    /// Records waiting now.
    pub queued: usize,
    /// The most records ever waiting at once (never above `queue_size`).
    pub queued_max: usize,
    /// Records dropped: queue full, or their batch was not accepted.
    pub dropped: u64,
    /// Records the collector accepted or the file took.
    pub shipped: u64,
}

/// One destination's queue; shared by every `analytics` middleware with the same options.
pub(super) struct Sink {
    sender: mpsc::Sender<Record>,
    stats: Arc<SinkStats>,
    destination: String,
}

impl Sink {
    /// Starts the shipping task on the current tokio runtime.
    pub(super) fn start(
        destination: Destination,
        batch_size: usize,
        flush_interval: Duration,
        queue_size: usize,
        runtime: &tokio::runtime::Handle,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(queue_size);
        let stats = Arc::new(SinkStats::default());
        let described = destination.describe();
        let shipper = Shipper {
            destination,
            stats: stats.clone(),
            failing: AtomicBool::new(false),
        };
        runtime.spawn(shipper.run(receiver, batch_size, flush_interval));
        Self {
            sender,
            stats,
            destination: described,
        }
    }

    /// Queues `record` without waiting; a full queue drops it (counted).
    pub(super) fn push(&self, record: Record) {
        match self.sender.try_send(record) {
            Ok(()) => {
                let queued = self.sender.max_capacity() - self.sender.capacity();
                self.stats.queued_max.fetch_max(queued, Ordering::Relaxed);
            }
            Err(TrySendError::Full(record) | TrySendError::Closed(record)) => {
                record.dropped.inc();
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The sink's counts now.
    pub(super) fn snapshot(&self) -> SinkSnapshot {
        SinkSnapshot {
            destination: self.destination.clone(),
            queue_size: self.sender.max_capacity(),
            queued: self.sender.max_capacity() - self.sender.capacity(),
            queued_max: self.stats.queued_max.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
            shipped: self.stats.shipped.load(Ordering::Relaxed),
        }
    }
}

struct Shipper {
    destination: Destination,
    stats: Arc<SinkStats>,
    failing: AtomicBool,
}

impl Shipper {
    async fn run(
        self,
        mut receiver: mpsc::Receiver<Record>,
        batch_size: usize,
        flush_interval: Duration,
    ) {
        let mut batch = Vec::with_capacity(batch_size);
        let mut deadline: Option<Instant> = None;
        loop {
            let room = batch_size - batch.len();
            let received = match deadline {
                Some(at) => {
                    match tokio::time::timeout_at(at, receiver.recv_many(&mut batch, room)).await {
                        Ok(received) => received,
                        Err(_) => {
                            self.ship(&mut batch).await;
                            deadline = None;
                            continue;
                        }
                    }
                }
                None => receiver.recv_many(&mut batch, room).await,
            };
            if received == 0 {
                // Every sender is gone: ship what is left and end.
                self.ship(&mut batch).await;
                break;
            }
            if deadline.is_none() {
                deadline = Some(Instant::now() + flush_interval);
            }
            if batch.len() >= batch_size {
                self.ship(&mut batch).await;
                deadline = None;
            }
            if batch.is_empty() {
                deadline = None;
            }
        }
        if let Destination::Collector { client, .. } = &self.destination {
            client.close();
        }
    }

    /// Ships `batch` (emptying it); a failure drops and counts its records.
    async fn ship(&self, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let result = match &self.destination {
            Destination::Collector {
                client,
                url,
                timeout,
            } => {
                let body = json_array(batch);
                match tokio::time::timeout(*timeout, post(client, url, body)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                }
            }
            Destination::File(path) => append(path, json_lines(batch)).await,
        };
        match result {
            Ok(()) => {
                self.stats
                    .shipped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(destination = %self.destination.describe(), "analytics: shipping records again");
                }
            }
            Err(error) => {
                for record in batch.iter() {
                    record.dropped.inc();
                }
                self.stats
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(destination = %self.destination.describe(), error, "analytics: cannot ship records; dropping them until it works again");
                }
            }
        }
        batch.clear();
    }
}

fn json_array(batch: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 256);
    out.push(b'[');
    for (index, record) in batch.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        if record.write_json(&mut out).is_err() {
            // Unreachable for these fields; keep the array valid anyway.
            out.extend_from_slice(b"null");
        }
    }
    out.push(b']');
    out
}

fn json_lines(batch: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 256);
    for record in batch {
        let start = out.len();
        if record.write_json(&mut out).is_ok() {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
    out
}

async fn post(client: &client::Client, url: &Uri, body: Vec<u8>) -> Result<(), String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(url.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(full_body(body))
        .map_err(|err| err.to_string())?;
    // Boxed, not awaited in place: the client's future trips rustc's higher-ranked `Send`
    // check inside an `async fn`.
    let call: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(client.clone().oneshot(request));
    let response = call.await.map_err(|err| err.to_string())?;
    let status = response.status();
    // Read (and discard) the answer so the connection goes back to the pool.
    let _ = collect_limited(response.into_body(), 64 * 1024).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
    }
}

async fn append(path: &std::path::Path, lines: Vec<u8>) -> Result<(), String> {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|err| format!("open: {err}"))?;
    file.write_all(&lines)
        .await
        .map_err(|err| format!("write: {err}"))?;
    file.flush().await.map_err(|err| format!("write: {err}"))
}
