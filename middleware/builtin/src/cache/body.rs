//! A response body that streams to the client while a copy fills the cache.
//!
//! Each frame is handed on as soon as it arrives; a copy of the data is kept, and when the
//! body ends cleanly the copy is stored. A body that grows past the entry limit, carries
//! trailers, fails, or is dropped before its end is not stored.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};

use middleware::{Body, BoxError};

/// Called with the whole body once it ended cleanly.
pub type OnComplete = Box<dyn FnOnce(Bytes) + Send>;

pin_project_lite::pin_project! {
    /// See the module docs.
    pub struct TeeBody {
        #[pin]
        inner: Body,
        copy: BytesMut,
        limit: usize,
        on_complete: Option<OnComplete>,
    }
}

impl TeeBody {
    /// Streams `inner`, calling `on_complete` with its bytes if it ends within `limit`.
    pub fn new(inner: Body, limit: usize, on_complete: OnComplete) -> Self {
        let mut body = Self {
            inner,
            copy: BytesMut::new(),
            limit,
            on_complete: Some(on_complete),
        };
        // A body that is already over is never polled by some servers: store it now.
        if body.inner.is_end_stream() {
            if let Some(on_complete) = body.on_complete.take() {
                on_complete(Bytes::new());
            }
        }
        body
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) if this.on_complete.is_some() => {
                    if this.copy.len() + data.len() > *this.limit {
                        *this.on_complete = None;
                        *this.copy = BytesMut::new();
                    } else {
                        this.copy.extend_from_slice(data);
                    }
                }
                Some(_) => {}
                // Trailers are not kept: such a response is not stored.
                None => *this.on_complete = None,
            },
            Some(Err(_)) => *this.on_complete = None,
            None => {}
        }
        // Servers may stop polling once `is_end_stream` says so, so finish on that too.
        let ended = frame.is_none() || (matches!(frame, Some(Ok(_))) && this.inner.is_end_stream());
        if ended {
            if let Some(on_complete) = this.on_complete.take() {
                on_complete(std::mem::take(this.copy).freeze());
            }
        }
        Poll::Ready(frame)
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
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use middleware::full_body;

    fn recorder() -> (Arc<Mutex<Option<Bytes>>>, OnComplete) {
        let slot = Arc::new(Mutex::new(None));
        let writer = slot.clone();
        (
            slot,
            Box::new(move |bytes| *writer.lock().expect("lock") = Some(bytes)),
        )
    }

    fn chunks(parts: Vec<Result<Frame<Bytes>, BoxError>>) -> Body {
        StreamBody::new(futures_util::stream::iter(parts)).boxed_unsync()
    }

    #[tokio::test]
    async fn streams_and_stores_the_whole_body() {
        let (slot, on_complete) = recorder();
        let body = chunks(vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Ok(Frame::data(Bytes::from("cd"))),
        ]);
        let read = TeeBody::new(body, 10, on_complete)
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(read, "abcd");
        assert_eq!(slot.lock().expect("lock").as_deref(), Some(&b"abcd"[..]));

        let (slot, on_complete) = recorder();
        TeeBody::new(full_body("exact"), 10, on_complete)
            .collect()
            .await
            .expect("body");
        assert_eq!(slot.lock().expect("lock").as_deref(), Some(&b"exact"[..]));
    }

    #[tokio::test]
    async fn oversized_failed_or_trailered_bodies_are_not_stored() {
        let (slot, on_complete) = recorder();
        let body = chunks(vec![
            Ok(Frame::data(Bytes::from("abcdef"))),
            Ok(Frame::data(Bytes::from("ghijkl"))),
        ]);
        let read = TeeBody::new(body, 10, on_complete)
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(read, "abcdefghijkl", "the client still gets everything");
        assert!(slot.lock().expect("lock").is_none());

        let (slot, on_complete) = recorder();
        let body = chunks(vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Err("reset".into()),
        ]);
        assert!(TeeBody::new(body, 10, on_complete).collect().await.is_err());
        assert!(slot.lock().expect("lock").is_none());

        let (slot, on_complete) = recorder();
        let body = chunks(vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ]);
        TeeBody::new(body, 10, on_complete)
            .collect()
            .await
            .expect("body");
        assert!(slot.lock().expect("lock").is_none());

        let (slot, on_complete) = recorder();
        let body = chunks(vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Ok(Frame::data(Bytes::from("cd"))),
        ]);
        let mut tee = TeeBody::new(body, 10, on_complete);
        let first = tee.frame().await;
        assert!(first.is_some());
        drop(tee);
        assert!(
            slot.lock().expect("lock").is_none(),
            "a body dropped before its end is not stored"
        );
    }
}
