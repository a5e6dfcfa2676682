//! The request-body read timeout: a client that stops sending its body mid-way has its
//! request ended instead of holding the connection and an upstream connection forever.
//!
//! The timer measures the silence between body frames while the body is being read, not
//! the whole upload: a large upload that keeps flowing is never cut, and a body nobody
//! reads (the upstream is busy) is not the client's fault and is not timed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use middleware::BoxError;
use tokio::time::{Instant, Sleep};

use super::clock::Settings;

/// The error a request body ends with when the client sent nothing for the read timeout;
/// the proxy answers such a request with 408 and closes the connection.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the client sent no request body bytes for {0:?} (read timeout)")]
pub struct BodyReadTimeout(pub Duration);

impl BodyReadTimeout {
    /// Whether `err`, or an error it was caused by, is a body read timeout.
    pub fn is_cause_of(err: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(err);
        while let Some(current) = cause {
            if current.is::<BodyReadTimeout>() {
                return true;
            }
            cause = current.source();
        }
        false
    }
}

pin_project_lite::pin_project! {
    /// A downstream request body whose reads may not wait longer than the read timeout.
    pub(super) struct ReadTimeoutBody<B> {
        #[pin]
        inner: B,
        settings: Arc<Settings>,
        // Runs while a read waits; created on the first read that has to wait.
        silence: Option<Pin<Box<Sleep>>>,
        waiting: bool,
    }
}

impl<B> ReadTimeoutBody<B> {
    pub(super) fn new(inner: B, settings: Arc<Settings>) -> Self {
        Self {
            inner,
            settings,
            silence: None,
            waiting: false,
        }
    }
}

impl<B> HttpBody for ReadTimeoutBody<B>
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
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = this.settings.read_timeout;
        let silence = this
            .silence
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !*this.waiting {
            *this.waiting = true;
            silence.as_mut().reset(Instant::now() + timeout);
        }
        match silence.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.settings.expired.body.inc();
                Poll::Ready(Some(Err(Box::new(BodyReadTimeout(timeout)))))
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
