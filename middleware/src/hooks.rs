//! Phase hooks and body helpers for writing middlewares without tower boilerplate.
//!
//! A [`Filter`] has the three phases of fagongzi's gateway filters: [`Filter::pre`] sees
//! the request and may stop it with its own response, [`Filter::post`] sees the response
//! (including 5xx answers from the upstream), [`Filter::post_err`] sees a round trip that
//! failed without a response. [`FilterLayer`] turns a filter into a tower `Layer` over the
//! RoundTripper, so `Middleware::from_layer(name, FilterLayer::new(filter))` is a complete
//! middleware.
//!
//! Body hooks transform a body without the filter having to poll it: [`map_chunks`]
//! rewrites each chunk as it streams (nothing is buffered), [`accumulate`] buffers the
//! whole body up to a limit and transforms it once, [`observe`] watches the chunks and the
//! end of a body without changing it. Bodies a filter does not touch are passed on as they
//! are.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::{Body, BoxError};

/// One middleware written as request/response phases.
///
/// Every method has a no-op default; implement the phases you need.
pub trait Filter: Send + Sync + 'static {
    /// Runs before the request goes on. `Err(response)` stops the request: the response goes
    /// back through the outer middlewares and the inner ones never see the request.
    // A stopped request is the rare path; boxing the response would cost every filter.
    #[allow(clippy::result_large_err)]
    fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
        let _ = request;
        Ok(())
    }

    /// Runs on every response coming back, 5xx answers from the upstream included.
    fn post(&self, response: &mut Response<Body>) {
        let _ = response;
    }

    /// Runs when the round trip failed without a response (no node, connect failure,
    /// upstream reset, ...). The error goes on unchanged.
    fn post_err(&self, error: &BoxError) {
        let _ = error;
    }
}

/// A tower `Layer` running a [`Filter`] around the next service.
pub struct FilterLayer<F> {
    filter: Arc<F>,
}

impl<F> FilterLayer<F> {
    /// A layer running `filter`.
    pub fn new(filter: F) -> Self {
        Self {
            filter: Arc::new(filter),
        }
    }
}

impl<F> Clone for FilterLayer<F> {
    fn clone(&self) -> Self {
        Self {
            filter: self.filter.clone(),
        }
    }
}

impl<F, S> Layer<S> for FilterLayer<F> {
    type Service = FilterService<F, S>;

    fn layer(&self, inner: S) -> Self::Service {
        FilterService {
            filter: self.filter.clone(),
            inner,
        }
    }
}

/// The service built by [`FilterLayer`].
pub struct FilterService<F, S> {
    filter: Arc<F>,
    inner: S,
}

impl<F, S: Clone> Clone for FilterService<F, S> {
    fn clone(&self) -> Self {
        Self {
            filter: self.filter.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<F, S> Service<Request<Body>> for FilterService<F, S>
where
    F: Filter,
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = FilterFuture<F, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.filter.pre(&mut request) {
            Ok(()) => FilterFuture {
                state: FilterState::Running {
                    future: self.inner.call(request),
                    filter: self.filter.clone(),
                },
            },
            Err(response) => FilterFuture {
                state: FilterState::Stopped {
                    response: Some(response),
                },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`FilterService`]: either the filter's own answer or the inner
    /// call followed by the post phase.
    pub struct FilterFuture<F, Fut> {
        #[pin]
        state: FilterState<F, Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = FilterStateProj]
    enum FilterState<F, Fut> {
        Stopped { response: Option<Response<Body>> },
        Running { #[pin] future: Fut, filter: Arc<F> },
    }
}

impl<F, Fut> Future for FilterFuture<F, Fut>
where
    F: Filter,
    Fut: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FilterStateProj::Stopped { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Ready(Err("filter future polled after completion".into())),
            },
            FilterStateProj::Running { future, filter } => match ready!(future.poll(cx)) {
                Ok(mut response) => {
                    filter.post(&mut response);
                    Poll::Ready(Ok(response))
                }
                Err(error) => {
                    filter.post_err(&error);
                    Poll::Ready(Err(error))
                }
            },
        }
    }
}

/// A body grew past the limit an accumulating hook or a size check allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// Rewrites each data chunk of `body` with `transform` as it streams; trailers pass
/// unchanged. Nothing is buffered, so a chunk reaches the next hop as soon as the
/// previous one arrived. The length may change, so the body reports no exact size.
pub fn map_chunks<F>(body: Body, transform: F) -> Body
where
    F: FnMut(Bytes) -> Bytes + Send + 'static,
{
    MapChunks {
        inner: body,
        transform,
    }
    .boxed_unsync()
}

pin_project_lite::pin_project! {
    struct MapChunks<F> {
        #[pin]
        inner: Body,
        transform: F,
    }
}

impl<F> HttpBody for MapChunks<F>
where
    F: FnMut(Bytes) -> Bytes,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => Frame::data((this.transform)(data)),
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// How an observed body ended (see [`observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every frame was read.
    Complete,
    /// The body failed with an error.
    Error,
    /// The body was dropped before its end (the reader went away).
    Dropped,
}

/// What [`observe`] reports to: each data chunk as it passes, then the end, once.
pub trait BodyObserver: Send + 'static {
    /// Sees a data chunk as it is polled (default: nothing).
    fn data(&mut self, chunk: &Bytes) {
        let _ = chunk;
    }

    /// Called once, when the body ends, fails or is dropped.
    fn end(self, end: BodyEnd)
    where
        Self: Sized;
}

/// Passes `body` on unchanged while `observer` sees each data chunk as it is polled and
/// the end, once, when the body ends, fails or is dropped (a body that was already at its
/// end when dropped counts as [`BodyEnd::Complete`]). Nothing is buffered; the size hint
/// is kept. Counting the bytes of a streamed body and acting at its end is one call of
/// this, not one more hand-written `poll_frame`.
pub fn observe(body: Body, observer: impl BodyObserver) -> Body {
    Observed {
        inner: body,
        observer: Some(observer),
    }
    .boxed_unsync()
}

pin_project_lite::pin_project! {
    struct Observed<O: BodyObserver> {
        #[pin]
        inner: Body,
        observer: Option<O>,
    }

    impl<O: BodyObserver> PinnedDrop for Observed<O> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(observer) = this.observer.take() {
                observer.end(if this.inner.is_end_stream() {
                    BodyEnd::Complete
                } else {
                    BodyEnd::Dropped
                });
            }
        }
    }
}

impl<O: BodyObserver> HttpBody for Observed<O> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        let end = match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(observer)) = (frame.data_ref(), this.observer.as_mut()) {
                    observer.data(data);
                }
                None
            }
            Some(Err(_)) => Some(BodyEnd::Error),
            None => Some(BodyEnd::Complete),
        };
        if let Some(end) = end
            && let Some(observer) = this.observer.take()
        {
            observer.end(end);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Buffers `body` (at most `limit` bytes) and yields `transform(all bytes)` as one chunk,
/// followed by the body's trailers. The body is read only when the result is polled; a
/// body longer than `limit` ends the result with a [`BodyTooLarge`] error.
pub fn accumulate<F>(body: Body, limit: u64, transform: F) -> Body
where
    F: FnOnce(Bytes) -> Bytes + Send + 'static,
{
    Accumulate {
        state: AccumulateState::Reading {
            body,
            buffer: BytesMut::new(),
            limit,
            transform: Some(transform),
        },
    }
    .boxed_unsync()
}

/// Reads all of `body` (at most `limit` bytes) and returns its data and trailers.
pub async fn collect_limited(
    body: Body,
    limit: u64,
) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
    let mut body = body;
    let mut buffer = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                if buffer.len() as u64 + data.len() as u64 > limit {
                    return Err(BodyTooLarge { limit }.into());
                }
                buffer.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers = Some(map);
                }
            }
        }
    }
    Ok((buffer.freeze(), trailers))
}

/// A body of `data` followed by `trailers` (when there are some).
pub fn body_with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    let mut frames = VecDeque::with_capacity(2);
    if !data.is_empty() {
        frames.push_back(Frame::data(data));
    }
    if let Some(trailers) = trailers {
        frames.push_back(Frame::trailers(trailers));
    }
    Frames { frames }.boxed_unsync()
}

struct Frames {
    frames: VecDeque<Frame<Bytes>>,
}

impl HttpBody for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let length: usize = self
            .frames
            .iter()
            .filter_map(|frame| frame.data_ref())
            .map(Bytes::len)
            .sum();
        SizeHint::with_exact(length as u64)
    }
}

struct Accumulate<F> {
    state: AccumulateState<F>,
}

enum AccumulateState<F> {
    Reading {
        body: Body,
        buffer: BytesMut,
        limit: u64,
        transform: Option<F>,
    },
    Draining(VecDeque<Frame<Bytes>>),
}

// Every field is Unpin (the inner body is boxed), so the state machine needs no pinning.
impl<F> Unpin for Accumulate<F> {}

impl<F> HttpBody for Accumulate<F>
where
    F: FnOnce(Bytes) -> Bytes,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match &mut self.state {
                AccumulateState::Draining(frames) => {
                    return Poll::Ready(frames.pop_front().map(Ok));
                }
                AccumulateState::Reading {
                    body,
                    buffer,
                    limit,
                    transform,
                } => {
                    let trailers = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                        Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => {
                                if buffer.len() as u64 + data.len() as u64 > *limit {
                                    let limit = *limit;
                                    self.state = AccumulateState::Draining(VecDeque::new());
                                    return Poll::Ready(Some(Err(BodyTooLarge { limit }.into())));
                                }
                                buffer.extend_from_slice(&data);
                                continue;
                            }
                            Err(frame) => match frame.into_trailers() {
                                Ok(trailers) => Some(trailers),
                                Err(_) => continue,
                            },
                        },
                        None => None,
                    };
                    let data = std::mem::take(buffer).freeze();
                    let data = match transform.take() {
                        Some(transform) => transform(data),
                        None => data,
                    };
                    let mut frames = VecDeque::with_capacity(2);
                    frames.push_back(Frame::data(data));
                    if let Some(trailers) = trailers {
                        frames.push_back(Frame::trailers(trailers));
                    }
                    self.state = AccumulateState::Draining(frames);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.state, AccumulateState::Draining(frames) if frames.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            AccumulateState::Draining(frames) => SizeHint::with_exact(
                frames
                    .iter()
                    .filter_map(|frame| frame.data_ref())
                    .map(|d| d.len() as u64)
                    .sum(),
            ),
            AccumulateState::Reading { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::StreamExt;
    use http::StatusCode;
    use http_body_util::StreamBody;
    use tower::ServiceExt;

    use super::*;
    use crate::{RoundTripper, full_body};

    /// A body that yields `chunks` one by one from a channel (the test feeds it).
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(stream).boxed_unsync())
    }

    #[tokio::test]
    async fn map_chunks_transforms_each_chunk_as_it_arrives() {
        let (tx, body) = channel_body();
        let mut body = map_chunks(body, |chunk| Bytes::from(chunk.to_ascii_uppercase()));
        tx.send(Ok(Frame::data(Bytes::from("ab"))))
            .await
            .expect("send");
        // The first chunk comes out before the second one exists.
        let first = body
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(first, "AB");
        tx.send(Ok(Frame::data(Bytes::from("cd"))))
            .await
            .expect("send");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        tx.send(Ok(Frame::trailers(trailers))).await.expect("send");
        drop(tx);
        let second = body
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(second, "CD");
        let last = body.frame().await.expect("frame").expect("ok");
        assert_eq!(
            last.trailers_ref()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn accumulate_transforms_once_at_the_end() {
        let (tx, body) = channel_body();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let body = accumulate(body, 100, move |all| {
            seen.lock().expect("lock").push(all.clone());
            Bytes::from(String::from_utf8_lossy(&all).replace("hello", "bye"))
        });
        for chunk in ["hel", "lo wo", "rld"] {
            tx.send(Ok(Frame::data(Bytes::from(chunk))))
                .await
                .expect("send");
        }
        drop(tx);
        let collected = body.collect().await.expect("collect").to_bytes();
        assert_eq!(collected, "bye world");
        assert_eq!(
            calls.lock().expect("lock").as_slice(),
            &[Bytes::from("hello world")]
        );
    }

    #[tokio::test]
    async fn accumulate_over_the_limit_is_an_error() {
        let body = accumulate(full_body("0123456789"), 4, |all| all);
        let error = body.collect().await.expect_err("too large");
        assert_eq!(
            error.downcast_ref::<BodyTooLarge>(),
            Some(&BodyTooLarge { limit: 4 })
        );
        let exact = accumulate(full_body("0123"), 4, |all| all)
            .collect()
            .await
            .expect("fits");
        assert_eq!(exact.to_bytes(), "0123");
    }

    #[tokio::test]
    async fn collect_limited_keeps_trailers_and_checks_the_limit() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().expect("value"));
        let body = body_with_trailers(Bytes::from("abc"), Some(trailers));
        let (data, trailers) = collect_limited(body, 3).await.expect("fits");
        assert_eq!(data, "abc");
        assert!(trailers.is_some_and(|t| t.contains_key("x-t")));
        let error = collect_limited(full_body("abcd"), 3)
            .await
            .expect_err("too large");
        assert!(error.is::<BodyTooLarge>());
    }

    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        stop: bool,
    }

    impl Filter for Recorder {
        fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
            self.log
                .lock()
                .expect("lock")
                .push(format!("pre {}", self.name));
            request
                .headers_mut()
                .append("x-order", self.name.parse().expect("value"));
            if self.stop {
                let mut response = Response::new(full_body("stopped"));
                *response.status_mut() = StatusCode::FORBIDDEN;
                return Err(response);
            }
            Ok(())
        }

        fn post(&self, response: &mut Response<Body>) {
            self.log
                .lock()
                .expect("lock")
                .push(format!("post {}", self.name));
            response
                .headers_mut()
                .append("x-order", self.name.parse().expect("value"));
        }

        fn post_err(&self, error: &BoxError) {
            self.log
                .lock()
                .expect("lock")
                .push(format!("post_err {} {error}", self.name));
        }
    }

    fn echo_order() -> RoundTripper {
        RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
            let seen: Vec<_> = request
                .headers()
                .get_all("x-order")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            Ok::<_, BoxError>(Response::new(full_body(seen.join(","))))
        }))
    }

    fn chain(filters: Vec<Recorder>, inner: RoundTripper) -> RoundTripper {
        let mut service = inner;
        for filter in filters.into_iter().rev() {
            service = RoundTripper::new(FilterLayer::new(filter).layer(service));
        }
        service
    }

    #[tokio::test]
    async fn filters_run_pre_in_order_and_post_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let recorder = |name, stop| Recorder {
            name,
            log: log.clone(),
            stop,
        };
        let service = chain(
            vec![
                recorder("a", false),
                recorder("b", false),
                recorder("c", false),
            ],
            echo_order(),
        );
        let response = service
            .oneshot(Request::new(full_body("")))
            .await
            .expect("response");
        let order: Vec<_> = response
            .headers()
            .get_all("x-order")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(order, ["c", "b", "a"]);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "a,b,c");
        assert_eq!(
            *log.lock().expect("lock"),
            ["pre a", "pre b", "pre c", "post c", "post b", "post a"]
        );
    }

    #[tokio::test]
    async fn a_pre_error_stops_the_request_and_outer_filters_see_the_response() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let recorder = |name, stop| Recorder {
            name,
            log: log.clone(),
            stop,
        };
        let service = chain(
            vec![
                recorder("a", false),
                recorder("b", true),
                recorder("c", false),
            ],
            echo_order(),
        );
        let response = service
            .oneshot(Request::new(full_body("")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(*log.lock().expect("lock"), ["pre a", "pre b", "post a"]);
    }

    #[tokio::test]
    async fn post_err_sees_upstream_failures() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let failing = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            Err::<Response<Body>, BoxError>("connection refused".into())
        }));
        let service = chain(
            vec![Recorder {
                name: "a",
                log: log.clone(),
                stop: false,
            }],
            failing,
        );
        let error = service
            .oneshot(Request::new(full_body("")))
            .await
            .expect_err("error");
        assert_eq!(error.to_string(), "connection refused");
        assert_eq!(
            *log.lock().expect("lock"),
            ["pre a", "post_err a connection refused"]
        );
    }

    /// Counts data bytes and records how the body ended, in a shared log.
    struct Seen {
        bytes: usize,
        log: Arc<Mutex<Vec<(usize, BodyEnd)>>>,
    }

    impl BodyObserver for Seen {
        fn data(&mut self, chunk: &Bytes) {
            self.bytes += chunk.len();
        }

        fn end(self, end: BodyEnd) {
            self.log.lock().expect("lock").push((self.bytes, end));
        }
    }

    #[tokio::test]
    async fn observe_counts_chunks_and_reports_the_end_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = || Seen {
            bytes: 0,
            log: log.clone(),
        };
        let (tx, body) = channel_body();
        let mut body = observe(body, seen());
        tx.send(Ok(Frame::data(Bytes::from("abc"))))
            .await
            .expect("send");
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "abc");
        assert!(log.lock().expect("lock").is_empty(), "not ended yet");
        tx.send(Ok(Frame::data(Bytes::from("de"))))
            .await
            .expect("send");
        drop(tx);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(*log.lock().expect("lock"), [(5, BodyEnd::Complete)]);

        // Dropped in the middle, failed, and empty bodies dropped unpolled.
        let (tx, body) = channel_body();
        let mut body = observe(body, seen());
        tx.send(Ok(Frame::data(Bytes::from("x"))))
            .await
            .expect("send");
        assert!(body.frame().await.is_some());
        drop(body);
        let (tx, body) = channel_body();
        let mut body = observe(body, seen());
        tx.send(Err("reset".into())).await.expect("send");
        assert!(body.frame().await.expect("frame").is_err());
        drop(body);
        drop(observe(crate::empty_body(), seen()));
        assert_eq!(
            log.lock().expect("lock")[1..],
            [
                (1, BodyEnd::Dropped),
                (0, BodyEnd::Error),
                (0, BodyEnd::Complete)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn map_chunks_streams_without_waiting_for_the_end() {
        let stream = futures_util::stream::iter(["a", "b", "c"]).then(|chunk| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from(chunk)))
        });
        let start = tokio::time::Instant::now();
        let mut body = map_chunks(StreamBody::new(stream).boxed_unsync(), |c| c);
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "a");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
