//! The gateway's own HTTP/1.1 client exchange, for requests without a body.
//!
//! # Why not hyper's `client::conn::http1` for these
//! hyper drives each upstream connection from a task of its own: a request is handed to it
//! through a channel, the response head comes back through a oneshot, and its body through
//! another channel, so every request wakes two tasks and crosses four queues. In callgrind
//! on the benchmark (one keep-alive GET through the gateway) that connection task and the
//! sender's side cost 15k of the 34k instructions of a request. Most requests through a
//! gateway carry no body (GET, HEAD, DELETE), and for those the exchange is short: write
//! one head, read one head, read a framed body. Here the request's own task does it on the
//! socket directly: the head is encoded into a buffer the connection keeps, the response
//! head is parsed with `httparse` (the parser hyper uses) into a `HeaderMap` whose values
//! are slices of the bytes read, and the body is read by the downstream connection's task
//! as it writes it out. The connection goes back to its pool when the body's last byte has
//! been read.
//!
//! Everything else stays with hyper: requests with a body (a body has to be written while
//! the response may already be arriving), upgrades (`Upgrade`, `CONNECT`) and HTTP/2.
//!
//! # What it does
//! - Response framing as RFC 9112 §6.3 says: none for `HEAD`, `1xx`, `204` and `304`;
//!   `Transfer-Encoding` (chunked, with trailers) before `Content-Length`; a body without
//!   either ends when the node closes the connection, which is then not reused.
//! - Interim `1xx` answers (`103 Early Hints`) are read past; a `101` is an error (no upgrade
//!   was asked for).
//! - A response head larger than the limit is an error, as are more than 100 headers.
//! - A connection is kept when the response allows it (`HTTP/1.1` without
//!   `Connection: close`, `HTTP/1.0` with `keep-alive`) and its body was read to the end.
//!   A `Connection` field of only `close` and `keep-alive` is not passed on (it concerns
//!   this hop alone); one that names other fields is, so the proxy strips those too.
//! - The framing fields are read as the head is parsed, and common field names are matched
//!   directly (`known_name`); other names go through `HeaderName::from_bytes`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use middleware::BoxError;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use crate::pool::Stream;

/// hyper's default limit on the number of response headers.
const MAX_HEADERS: usize = 100;
/// Bytes read at a time once a read buffer is used up, to start with. A read that fills
/// what was reserved doubles the next reservation, up to `MAX_READ_SIZE`, so a large body
/// streams in large reads (with 16 KiB reads a 1 GiB download took 19% more CPU than
/// nginx's; tests/bench bodies scenario); a connection going back to its pool starts small
/// again.
const READ_SIZE: usize = 16 * 1024;
const MAX_READ_SIZE: usize = 256 * 1024;
/// Response fields a middleware chain may add without the header map growing.
const ROOM: usize = 8;
/// Longest chunk-size line (with extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// An upstream HTTP/1.1 connection between exchanges.
pub(crate) struct Conn {
    io: Stream,
    /// Bytes read and not yet used (the node may send nothing ahead, so this is normally
    /// empty between exchanges).
    read: BytesMut,
    /// The request head being written; its allocation is kept for the next request.
    head: Vec<u8>,
    /// What the next read reserves when the buffer is used up.
    read_size: usize,
    /// Where each field of the last response head was (kept for its allocation).
    spans: Vec<Span>,
}

/// (name start, name end, value start, value end) of a field, as offsets into its head.
type Span = (u32, u32, u32, u32);

/// Why an exchange failed.
pub(crate) enum Failure {
    /// The connection was closed or reset before any byte of a response: on a reused
    /// connection, the node had closed it while idle.
    Closed(io::Error),
    /// The response head grew past the limit.
    HeadTooLarge,
    /// Any other I/O or protocol error.
    Broken(BoxError),
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Self::Broken(error.into())
    }
}

impl Conn {
    pub(crate) fn new(io: Stream) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            head: Vec::new(),
            read_size: READ_SIZE,
            spans: Vec::new(),
        }
    }

    /// Whether an idle connection can still be used: no end of stream, error or stray byte
    /// is waiting on it. Polls the socket once, never waits.
    pub(crate) fn is_open(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Writes the head of a request without a body, reads the response head, and returns
    /// the response with the body still to be read from this connection.
    pub(crate) async fn exchange(
        mut self,
        request: &Parts,
        max_head: usize,
    ) -> Result<(Response<()>, Framing, Self), Failure> {
        self.encode(request);
        let written = async {
            self.io.write_all(&self.head).await?;
            self.io.flush().await
        };
        if let Err(error) = written.await {
            return Err(match error.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    Failure::Closed(error)
                }
                _ => error.into(),
            });
        }
        let mut any = false;
        loop {
            if let Some((head, facts)) = self.parse_head(max_head)? {
                let status = head.status();
                if status.is_informational() {
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Failure::Broken("101 Switching Protocols unasked".into()));
                    }
                    continue;
                }
                let framing = Framing::of(&request.method, &head, facts);
                return Ok((head, framing, self));
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if !any => {
                    return Err(Failure::Closed(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => {
                    return Err(Failure::Broken(
                        "connection closed in the response head".into(),
                    ));
                }
                Ok(_) => any = true,
                Err(error) if !any && error.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Failure::Closed(error));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// `METHOD path HTTP/1.1`, then the headers as they are.
    fn encode(&mut self, request: &Parts) {
        let head = &mut self.head;
        head.clear();
        head.extend_from_slice(request.method.as_str().as_bytes());
        head.push(b' ');
        let target = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &request.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
    }

    /// A complete response head from the read buffer, if it holds one, with what its
    /// fields say about the framing of its body.
    fn parse_head(&mut self, max_head: usize) -> Result<Option<(Response<()>, Facts)>, Failure> {
        if self.read.is_empty() {
            return Ok(None);
        }
        // Where each field is, as offsets into the head, so the values can be slices of it
        // once it is frozen. (A fresh array of `MAX_HEADERS` spans cost a 1.6 KiB memset.)
        self.spans.clear();
        let (len, code, version) =
            {
                let mut headers =
                    [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut []);
                let len = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut parsed, &self.read, &mut headers)
                {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) if self.read.len() >= max_head => {
                        return Err(Failure::HeadTooLarge);
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(error) => return Err(Failure::Broken(error.into())),
                };
                if len > max_head {
                    return Err(Failure::HeadTooLarge);
                }
                let base = self.read.as_ptr() as usize;
                let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
                self.spans.extend(parsed.headers.iter().map(|header| {
                    let name = offset(header.name.as_bytes());
                    let value = offset(header.value);
                    (
                        name,
                        name + header.name.len() as u32,
                        value,
                        value + header.value.len() as u32,
                    )
                }));
                (
                    len,
                    parsed.code.unwrap_or_default(),
                    parsed.version.unwrap_or_default(),
                )
            };
        let head = self.read.split_to(len).freeze();
        let mut facts = Facts::default();
        // Room for the fields a middleware chain adds (CORS, rate-limit, rewrite) without
        // growing the map: a grow rehashes every field (1.3k instructions a request in
        // the tests/bench middleware scenario).
        let mut headers = HeaderMap::with_capacity(self.spans.len() + ROOM);
        for &(name_start, name_end, value_start, value_end) in &self.spans {
            let name = &head[name_start as usize..name_end as usize];
            let name = match known_name(name) {
                Some(known) => known,
                None => {
                    HeaderName::from_bytes(name).map_err(|error| Failure::Broken(error.into()))?
                }
            };
            let value = &head[value_start as usize..value_end as usize];
            if name == CONTENT_LENGTH {
                facts.content_length(value)?;
            } else if name == TRANSFER_ENCODING {
                facts.transfer_encoding(value);
            } else if name == CONNECTION && facts.connection(value) {
                // Only `close` or `keep-alive`: nothing the next hop would keep.
                continue;
            }
            let value = HeaderValue::from_maybe_shared(
                head.slice(value_start as usize..value_end as usize),
            )
            .map_err(|error| Failure::Broken(error.into()))?;
            headers.append(name, value);
        }
        let mut response = Response::new(());
        *response.status_mut() =
            StatusCode::from_u16(code).map_err(|error| Failure::Broken(error.into()))?;
        *response.version_mut() = if version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *response.headers_mut() = headers;
        Ok(Some((response, facts)))
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(self.read_size);
        }
        let room = self.read.capacity() - self.read.len();
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        ))?;
        if read == room && self.read_size < MAX_READ_SIZE {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(read))
    }

    /// Back to a small read buffer before the connection idles in its pool.
    fn shrink(&mut self) {
        if self.read_size > READ_SIZE {
            self.read_size = READ_SIZE;
            self.read = BytesMut::new();
        }
    }
}

/// How a response's body is delimited, and whether its connection can serve again.
pub(crate) struct Framing {
    kind: Kind,
    keep_alive: bool,
}

enum Kind {
    /// No body, or all of it read.
    Done,
    /// This many bytes still to read.
    Length(u64),
    /// Chunked: where the decoder is.
    Chunked(Chunk),
    /// Up to the end of the stream.
    Close,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, then the final CRLF.
    Trailers,
}

impl Framing {
    fn of(method: &Method, head: &Response<()>, facts: Facts) -> Self {
        let status = head.status();
        let kind = if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Kind::Done
        } else if facts.transfer_encodings > 0 {
            // Not chunked last (or several fields): only the end of the stream ends it.
            if facts.transfer_encodings == 1 && facts.chunked_last {
                Kind::Chunked(Chunk::Size)
            } else {
                Kind::Close
            }
        } else {
            match facts.length {
                Some(0) => Kind::Done,
                Some(length) => Kind::Length(length),
                None => Kind::Close,
            }
        };
        // A body delimited by the close ends the connection with it.
        let keep_alive = !matches!(kind, Kind::Close)
            && !facts.close
            && (head.version() != Version::HTTP_10 || facts.keep_alive);
        Self { kind, keep_alive }
    }

    /// Whether nothing remains to be read.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }
}

/// What a response head's fields say about its body and its connection, noted as the
/// head is parsed.
#[derive(Default)]
struct Facts {
    /// `Content-Length`: one value, or several that agree (RFC 9110 §8.6).
    length: Option<u64>,
    /// How many `Transfer-Encoding` fields, and whether the last coding is `chunked`.
    transfer_encodings: u32,
    chunked_last: bool,
    /// `close` or `keep-alive` among the `Connection` tokens.
    close: bool,
    keep_alive: bool,
}

impl Facts {
    fn content_length(&mut self, value: &[u8]) -> Result<(), Failure> {
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let parsed = std::str::from_utf8(part)
                .ok()
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u64>().ok())
                .ok_or_else(|| Failure::Broken("invalid Content-Length".into()))?;
            if self.length.is_some_and(|seen| seen != parsed) {
                return Err(Failure::Broken("conflicting Content-Length values".into()));
            }
            self.length = Some(parsed);
        }
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encodings += 1;
        let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
        self.chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
    }

    /// Notes the `Connection` tokens; true when they are only `close` and `keep-alive`.
    fn connection(&mut self, value: &[u8]) -> bool {
        let mut only_these = true;
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                only_these = false;
            }
        }
        only_these
    }
}

/// The name of a header most responses carry, found without `HeaderName::from_bytes`'s
/// general parse (about 200 instructions a name): the length and first letter pick the one
/// candidate, compared once.
fn known_name(name: &[u8]) -> Option<HeaderName> {
    use http::header;
    let first = name.first()? | 0x20;
    let (candidate, known) = match (name.len(), first) {
        (4, b'd') => (&b"date"[..], header::DATE),
        (4, b'e') => (&b"etag"[..], header::ETAG),
        (4, b'v') => (&b"vary"[..], header::VARY),
        (6, b's') => (&b"server"[..], header::SERVER),
        (7, b'e') => (&b"expires"[..], header::EXPIRES),
        (8, b'l') => (&b"location"[..], header::LOCATION),
        (10, b'c') => (&b"connection"[..], header::CONNECTION),
        (10, b's') => (&b"set-cookie"[..], header::SET_COOKIE),
        (12, b'c') => (&b"content-type"[..], header::CONTENT_TYPE),
        (13, b'a') => (&b"accept-ranges"[..], header::ACCEPT_RANGES),
        (13, b'c') => (&b"cache-control"[..], header::CACHE_CONTROL),
        (13, b'l') => (&b"last-modified"[..], header::LAST_MODIFIED),
        (14, b'c') => (&b"content-length"[..], header::CONTENT_LENGTH),
        (16, b'c') => (&b"content-encoding"[..], header::CONTENT_ENCODING),
        (17, b't') => (&b"transfer-encoding"[..], header::TRANSFER_ENCODING),
        _ => return None,
    };
    // Setting bit 0x20 lowercases a letter and keeps `-`; `httparse` has checked that the
    // name holds token characters only, none of which becomes a lowercase letter or `-`
    // that way unless it was one (or its capital).
    let same = name
        .iter()
        .zip(candidate)
        .all(|(&byte, &lower)| byte | 0x20 == lower);
    same.then_some(known)
}

/// Where a finished connection goes: back to its node's pool.
pub(crate) trait Release: Send + Sync {
    fn release(&self, conn: Conn);
}

/// A response body read from its upstream connection by whoever polls it (the downstream
/// connection's task). At its end the connection is given back, when it may serve again.
pub(crate) struct RawBody {
    conn: Option<Conn>,
    framing: Framing,
    home: std::sync::Arc<dyn Release>,
}

impl RawBody {
    pub(crate) fn new(conn: Conn, framing: Framing, home: std::sync::Arc<dyn Release>) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing,
            home,
        };
        if body.framing.is_done() {
            body.finish();
        }
        body
    }

    /// The body has been read to its end.
    fn finish(&mut self) {
        self.framing.kind = Kind::Done;
        // Bytes past the body's end would be read as the next response: not kept then.
        if let Some(mut conn) = self.conn.take()
            && self.framing.keep_alive
            && conn.read.is_empty()
        {
            conn.shrink();
            self.home.release(conn);
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing.kind {
                Kind::Done => return Poll::Ready(None),
                Kind::Length(left) => {
                    if conn.read.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err("connection closed in the body".into())));
                    }
                    let take = (conn.read.len() as u64).min(left) as usize;
                    let data = conn.read.split_to(take).freeze();
                    self.framing.kind = Kind::Length(left - take as u64);
                    if left == take as u64 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Kind::Close => {
                    if conn.read.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Kind::Chunked(chunk) => {
                    if let Some(frame) = self.decode(chunk)? {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // Ended without trailers, or more bytes are needed.
                    if self.framing.is_done() {
                        return Poll::Ready(None);
                    }
                    let conn = self
                        .conn
                        .as_mut()
                        .expect("a body being read has its connection");
                    if ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err("connection closed in the body".into())));
                    }
                }
            }
        }
    }

    /// Steps the chunked decoder over the buffered bytes: a frame, or `None` when more bytes
    /// are needed (or the body ended).
    fn decode(&mut self, mut chunk: Chunk) -> Result<Option<Frame<Bytes>>, BoxError> {
        let conn = self
            .conn
            .as_mut()
            .expect("a chunked body being read has its connection");
        loop {
            match chunk {
                Chunk::Size => match httparse::parse_chunk_size(&conn.read) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        conn.read.advance(used);
                        chunk = Chunk::Trailers;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.read.advance(used);
                        chunk = Chunk::Data(size);
                    }
                    Ok(httparse::Status::Partial) if conn.read.len() > MAX_CHUNK_LINE => {
                        return Err("chunk-size line too long".into());
                    }
                    Ok(httparse::Status::Partial) => break,
                    Err(_) => return Err("invalid chunk size".into()),
                },
                Chunk::Data(left) => {
                    if conn.read.is_empty() {
                        break;
                    }
                    let take = (conn.read.len() as u64).min(left) as usize;
                    let data = conn.read.split_to(take).freeze();
                    let left = left - take as u64;
                    self.framing.kind = Kind::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(Frame::data(data)));
                }
                Chunk::DataEnd => {
                    if conn.read.len() < 2 {
                        break;
                    }
                    if &conn.read[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    conn.read.advance(2);
                    chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&conn.read, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for field in fields {
                                let name = HeaderName::from_bytes(field.name.as_bytes())?;
                                trailers.append(name, HeaderValue::from_bytes(field.value)?);
                            }
                            conn.read.advance(used);
                            self.finish();
                            return Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)));
                        }
                        Ok(httparse::Status::Partial) if conn.read.len() > MAX_CHUNK_LINE * 4 => {
                            return Err("trailers too large".into());
                        }
                        Ok(httparse::Status::Partial) => break,
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        }
        self.framing.kind = Kind::Chunked(chunk);
        Ok(None)
    }
}

impl HttpBody for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_data(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            // A broken body leaves its connection unusable.
            this.conn = None;
            this.framing.kind = Kind::Done;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.kind {
            Kind::Done => SizeHint::with_exact(0),
            Kind::Length(left) => SizeHint::with_exact(left),
            Kind::Chunked(_) | Kind::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::Request;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::error::Error;
    use crate::pool::{NodePool, PoolSettings, Pools, Transport};

    /// What the scripted node does with one request.
    struct Reply {
        /// Written in these pieces, each flushed on its own.
        pieces: Vec<&'static [u8]>,
        /// Close the connection after it.
        close: bool,
    }

    fn reply(pieces: &[&'static [u8]]) -> Reply {
        Reply {
            pieces: pieces.to_vec(),
            close: false,
        }
    }

    fn then_close(pieces: &[&'static [u8]]) -> Reply {
        Reply {
            pieces: pieces.to_vec(),
            close: true,
        }
    }

    /// A scripted node: its address, how many connections it accepted, and how many it
    /// closed after a reply.
    struct Node {
        address: String,
        accepted: Arc<AtomicUsize>,
        closed: tokio::sync::watch::Receiver<usize>,
    }

    /// A node on 127.0.0.1 answering successive requests, on whatever connection they
    /// come, with `replies` in order.
    async fn node(replies: Vec<Reply>) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (closes, closed) = tokio::sync::watch::channel(0);
        tokio::spawn(async move {
            let mut replies = replies.into_iter();
            'accept: while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                loop {
                    let mut request = Vec::new();
                    while !request.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            continue 'accept;
                        }
                        request.push(byte[0]);
                    }
                    let Some(reply) = replies.next() else { return };
                    for piece in reply.pieces {
                        stream.write_all(piece).await.unwrap();
                        stream.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    if reply.close {
                        drop(stream);
                        closes.send_modify(|count| *count += 1);
                        continue 'accept;
                    }
                }
            }
        });
        Node {
            address,
            accepted,
            closed,
        }
    }

    fn pool(address: &str) -> (Arc<Pools>, Arc<NodePool>) {
        let pools = Pools::new(PoolSettings {
            connect_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(90),
            max_idle: 4,
            max_buf_size: 1024,
        });
        let transport = Transport::new(crate::tls::default_client_config(), false);
        let pool = pools.node_pool(address, false, &transport).unwrap();
        (pools, pool)
    }

    fn request(method: &str) -> Request<middleware::Body> {
        let body = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        Request::builder()
            .method(method)
            .uri("/")
            .header(http::header::HOST, "node")
            .body(body)
            .unwrap()
    }

    /// Status, body and trailers of one request through `pool`.
    async fn exchange(
        pool: &Arc<NodePool>,
        method: &str,
    ) -> Result<(u16, String, Option<http::HeaderMap>), String> {
        let (response, _) = pool
            .send(request(method))
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|error| error.to_string())?;
        let trailers = collected.trailers().cloned();
        let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
        Ok((status, body, trailers))
    }

    fn idle(pool: &NodePool) -> usize {
        pool.idle_raw_len()
    }

    #[tokio::test]
    async fn a_chunked_body_in_pieces_with_trailers_is_read_and_the_connection_reused() {
        let Node {
            address, accepted, ..
        } = node(vec![
            reply(&[
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                b"lo\r\n",
                b"6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            ]),
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        let (status, body, trailers) = exchange(&pool, "GET").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "hello world"));
        assert_eq!(trailers.unwrap()["x-sum"], "11");
        assert_eq!(idle(&pool), 1);
        let (_, body, _) = exchange(&pool, "GET").await.unwrap();
        assert_eq!(body, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for both"
        );
    }

    #[tokio::test]
    async fn a_body_without_length_ends_with_the_connection_which_is_not_kept() {
        let Node { address, .. } = node(vec![then_close(&[
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstreamed ",
            b"until close",
        ])])
        .await;
        let (_pools, pool) = pool(&address);
        let (_, body, _) = exchange(&pool, "GET").await.unwrap();
        assert_eq!(body, "streamed until close");
        assert_eq!(idle(&pool), 0);
    }

    #[tokio::test]
    async fn interim_answers_are_read_past_and_head_and_204_have_no_body() {
        let Node {
            address, accepted, ..
        } = node(vec![
            reply(&[
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody",
            ]),
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"]),
            reply(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
            reply(&[b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        assert_eq!(exchange(&pool, "GET").await.unwrap().1, "body");
        let (status, body, _) = exchange(&pool, "HEAD").await.unwrap();
        assert_eq!((status, body.as_str()), (200, ""));
        let (status, body, _) = exchange(&pool, "DELETE").await.unwrap();
        assert_eq!((status, body.as_str()), (204, ""));
        // HTTP/1.0 without keep-alive: read, then not kept.
        assert_eq!(exchange(&pool, "GET").await.unwrap().1, "old");
        assert_eq!(idle(&pool), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_while_idle_is_replaced() {
        let Node {
            address,
            accepted,
            mut closed,
        } = node(vec![
            then_close(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"]),
            then_close(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"]),
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        assert_eq!(exchange(&pool, "GET").await.unwrap().1, "a");
        // The node closed it after answering; the pool still holds it.
        assert_eq!(idle(&pool), 1);
        // A GET is written, meets the closed connection, and goes again on a new one.
        assert_eq!(exchange(&pool, "GET").await.unwrap().1, "b");
        // A POST is not sent on a connection found closed: it is checked first.
        closed.wait_for(|count| *count == 2).await.unwrap();
        assert_eq!(exchange(&pool, "POST").await.unwrap().1, "c");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn bytes_past_the_body_are_never_read_as_the_next_response() {
        let Node {
            address, accepted, ..
        } = node(vec![
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 500 Stray\r\n\r\n"]),
            reply(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        assert_eq!(exchange(&pool, "GET").await.unwrap().1, "a");
        assert_eq!(idle(&pool), 0, "a connection with stray bytes is not kept");
        assert_eq!(
            exchange(&pool, "GET").await.unwrap(),
            (200, "b".into(), None)
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn header_names_in_any_case_and_connection_fields_reach_the_caller_as_they_should() {
        let Node {
            address, accepted, ..
        } = node(vec![
            reply(&[b"HTTP/1.1 200 OK\r\nCONTENT-type: text/plain\r\nX-Custom: a\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\ncontent-LENGTH: 2\r\n\r\nok"]),
            then_close(&[b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        let (response, _) = pool.send(request("GET")).await.unwrap();
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers["x-custom"], "a");
        // It names another field: kept, so the proxy can strip what it lists.
        assert_eq!(headers["connection"], "keep-alive, X-Hop");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(idle(&pool), 1);
        let (response, _) = pool.send(request("GET")).await.unwrap();
        // Only `close`: not passed on, and the connection is not kept.
        assert!(!response.headers().contains_key("connection"));
        assert_eq!(response.headers()["content-length"], "2");
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(idle(&pool), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bad_framing_and_oversized_heads_are_errors() {
        let Node { address, .. } = node(vec![
            then_close(&[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"]),
            then_close(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]),
            then_close(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]),
            then_close(&[b"HTTP/1.1 200 OK\r\nX-Big: ", &[b'a'; 2048], b"\r\n\r\n"]),
        ])
        .await;
        let (_pools, pool) = pool(&address);
        let conflicting = exchange(&pool, "GET").await.unwrap_err();
        assert!(
            conflicting.contains("conflicting Content-Length"),
            "{conflicting}"
        );
        let truncated = exchange(&pool, "GET").await.unwrap_err();
        assert!(truncated.contains("closed in the body"), "{truncated}");
        let chunk = exchange(&pool, "GET").await.unwrap_err();
        assert!(chunk.contains("invalid chunk size"), "{chunk}");
        let (response, _) = (pool.send(request("GET")).await).map_or_else(
            |error| (Some(error), None::<()>),
            |_| panic!("a 2 KiB head passed a 1 KiB limit"),
        );
        assert!(matches!(
            response,
            Some(Error::ResponseHeadTooLarge { limit: 1024, .. })
        ));
        assert_eq!(idle(&pool), 0);
    }
}
