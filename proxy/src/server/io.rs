//! The downstream socket as the HTTP server sees it: it tells the connection's clock when
//! bytes arrive (and whether they are an HTTP/2 preface), bounds how long a write may make
//! no progress, and holds the connection's place under the connection cap for as long as
//! the socket lives (an upgraded connection's tunnel included). [`Prefixed`] puts bytes
//! already read back in front of a stream, and [`Park`] waits for a stream to become
//! readable without reading (what lets an idle HTTP/1.1 connection give back hyper's
//! buffers, see [`super`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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
            _slot: slot,
        }
    }

    /// Whether the bytes read so far are the HTTP/2 preface (`Some(true)`), something else
    /// (`Some(false)`), or still a prefix of it (`None`).
    pub(super) fn http2(&self) -> Option<bool> {
        match self.protocol {
            Protocol::Undecided(_) => None,
            Protocol::Http1 => Some(false),
            Protocol::Http2 => Some(true),
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
            this.activity.set_write_blocked(false);
            return polled;
        }
        let timeout = this.activity.settings().write_timeout;
        let stall = this
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !this.activity.write_blocked() {
            this.activity.set_write_blocked(true);
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

/// A downstream stream whose readability can be awaited without reading from it.
pub(super) trait Park {
    /// Ready once bytes (or the end of the stream) can be read.
    fn poll_parked(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Park for TcpStream {
    fn poll_parked(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// An idle HTTP/1.1 connection has read everything rustls could decrypt (hyper's read
/// returned pending, so tokio-rustls drained the socket), so the socket's readiness is the
/// stream's.
impl Park for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_parked(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

impl<S: Park> WatchedIo<S> {
    /// Waits until the stream can be read, reading nothing.
    pub(super) async fn parked(&mut self) -> io::Result<()> {
        let inner = &mut self.inner;
        std::future::poll_fn(move |cx| inner.poll_parked(cx)).await
    }
}

pin_project_lite::pin_project! {
    /// A stream with bytes already read from it put back in front: the bytes read to tell
    /// HTTP/1.1 from HTTP/2, or what hyper had buffered when it gave the stream back.
    pub(crate) struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    pub(super) fn new(inner: S, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }

    /// The stream and the part of the prefix not read yet.
    pub(super) fn into_parts(self) -> (S, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_prefix_first_and_gives_back_what_is_left() {
        let (near, mut far) = tokio::io::duplex(64);
        far.write_all(b" world").await.unwrap();
        let mut stream = Prefixed::new(near, Bytes::from_static(b"hello"));
        let mut three = [0; 3];
        stream.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"hel");
        let (mut near, unread) = stream.into_parts();
        assert_eq!(unread, Bytes::from_static(b"lo"));
        let mut rest = [0; 6];
        near.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        let mut stream = Prefixed::new(near, unread);
        stream.write_all(b"back").await.unwrap();
        let mut back = [0; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        let mut two = [0; 2];
        stream.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"lo");
    }

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
