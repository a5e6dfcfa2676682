//! A response body that reports the pick's outcome to the selector when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use middleware::BoxError;
use selector::{Done, DoneInfo};

use crate::h1::RawBody;
use crate::pool::Lease;

pin_project_lite::pin_project! {
    /// Wraps an upstream body; reports `Done` at end of stream (success as decided at
    /// headers time) or on a body error (failure). Dropped early = cancelled. A body read to
    /// its end also gives its HTTP/1.1 connection back to the node's pool.
    pub struct DoneBody<B> {
        #[pin]
        inner: B,
        done: Option<Done>,
        success: bool,
        lease: Option<Lease>,
    }
}

impl<B> DoneBody<B> {
    /// Wraps `inner`; `success` is the outcome judged from the response head.
    pub fn new(inner: B, done: Done, success: bool) -> Self {
        Self {
            inner,
            done: Some(done),
            success,
            lease: None,
        }
    }

    /// As [`DoneBody::new`], returning `lease`'s connection to its pool at end of stream.
    pub(crate) fn with_lease(inner: B, done: Done, success: bool, lease: Option<Lease>) -> Self {
        Self {
            inner,
            done: Some(done),
            success,
            lease,
        }
    }
}

impl<B> HttpBody for DoneBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                finish(this.lease, this.done, *this.success);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                // A broken body leaves its connection unusable: dropped, never pooled.
                drop(this.lease.take());
                finish(&mut None, this.done, false);
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // hyper stops polling a body that says it has ended (a Content-Length body
                // after its last bytes), so the end is seen here too.
                if this.inner.is_end_stream() {
                    finish(this.lease, this.done, *this.success);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body ended: the connection goes back to its pool, the pick reports its outcome.
fn finish(lease: &mut Option<Lease>, done: &mut Option<Done>, success: bool) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
    if let Some(done) = done.take() {
        done.done(DoneInfo { success });
    }
}

/// An upstream response body: hyper's (`Left`), or one read by the gateway's own HTTP/1.1
/// exchange (`Right`).
pub(crate) type UpstreamBody = http_body_util::Either<hyper::body::Incoming, RawBody>;
