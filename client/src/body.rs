//! A response body that reports the pick's outcome to the selector when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use middleware::BoxError;
use selector::{Done, DoneInfo};

pin_project_lite::pin_project! {
    /// Wraps an upstream body; reports `Done` at end of stream (success as decided at
    /// headers time) or on a body error (failure). Dropped early = cancelled.
    pub struct DoneBody<B> {
        #[pin]
        inner: B,
        done: Option<Done>,
        success: bool,
    }
}

impl<B> DoneBody<B> {
    /// Wraps `inner`; `success` is the outcome judged from the response head.
    pub fn new(inner: B, done: Done, success: bool) -> Self {
        Self {
            inner,
            done: Some(done),
            success,
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done.done(DoneInfo {
                        success: *this.success,
                    });
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                if let Some(done) = this.done.take() {
                    done.done(DoneInfo { success: false });
                }
                Poll::Ready(Some(Err(err.into())))
            }
            other => other.map(|frame| frame.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
