//! The downstream socket as the HTTP server sees it: it tells the connection's clock when
//! bytes arrive (and whether they are an HTTP/2 preface), bounds how long a write may make
//! no progress, and holds the connection's place under the connection cap for as long as
//! the socket lives (an upgraded connection's tunnel included).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::clock::Activity;
use super::limit::ConnectionSlot;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the bytes read so far say about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Still a prefix of the HTTP/2 preface: this many bytes matched.
    Undecided(usize),
    Http1,
    Http2,
}

pin_project_lite::pin_project! {
    /// A downstream stream (TCP or TLS) watched for the connection's timeouts.
    pub(super) struct WatchedIo<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
        protocol: Protocol,
        // Runs while a write is blocked; created on the first blocked write.
        write_stall: Option<Pin<Box<Sleep>>>,
        write_blocked: bool,
        _slot: ConnectionSlot,
    }
}

impl<S> WatchedIo<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>, slot: ConnectionSlot) -> Self {
        Self {
            inner,
            activity,
            protocol: Protocol::Undecided(0),
            write_stall: None,
            write_blocked: false,
            _slot: slot,
        }
    }
}

impl<S> WatchedIo<S> {
    /// Passes a write's outcome through; a write that stays blocked for the write timeout
    /// fails with `TimedOut`, which ends the connection. Any progress restarts the wait.
    fn write_progress<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        if polled.is_ready() {
            *this.write_blocked = false;
            return polled;
        }
        let timeout = this.activity.settings().write_timeout;
        let stall = this
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !*this.write_blocked {
            *this.write_blocked = true;
            stall.as_mut().reset(Instant::now() + timeout);
        }
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.activity.settings().expired.write.inc();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("write timeout: the client read nothing for {timeout:?}"),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead> AsyncRead for WatchedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return polled;
        }
        match *this.protocol {
            Protocol::Http1 => this.activity.bytes_read(),
            Protocol::Http2 => {}
            Protocol::Undecided(matched) => {
                *this.protocol = detect(matched, read);
                if *this.protocol == Protocol::Http2 {
                    this.activity.preface_read();
                }
            }
        }
        polled
    }
}

/// The protocol after `read` follows `matched` bytes of the preface.
fn detect(matched: usize, read: &[u8]) -> Protocol {
    let wanted = &PREFACE[matched..];
    let compared = read.len().min(wanted.len());
    if read[..compared] != wanted[..compared] {
        Protocol::Http1
    } else if matched + compared == PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Undecided(matched + compared)
    }
}

impl<S: AsyncWrite> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write(cx, buf);
        self.write_progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.write_progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.write_progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_shutdown(cx);
        self.write_progress(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_recognised_across_reads_and_anything_else_is_http1() {
        assert_eq!(detect(0, b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(detect(0, b"PRI * HTTP/2.0\r\n"), Protocol::Undecided(16));
        assert_eq!(detect(16, b"\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(detect(0, PREFACE), Protocol::Http2);
        // The preface followed by frames in the same read.
        assert_eq!(
            detect(0, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04"),
            Protocol::Http2
        );
        assert_eq!(detect(3, b" * HTTP/1.1"), Protocol::Http1);
        assert_eq!(detect(0, b"P"), Protocol::Undecided(1));
        assert_eq!(detect(1, b"OST / HTTP/1.1"), Protocol::Http1);
    }
}
