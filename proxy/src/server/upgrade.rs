//! HTTP/1.1 upgrades handed over by the server itself.
//!
//! The server drives each HTTP/1.1 connection with hyper's `poll_without_shutdown`, so it
//! can take the socket back from an idle connection (see [`super`]). hyper then leaves an
//! upgrade to its caller: once the `101` is written, the connection finishes and the server
//! takes the socket (with whatever the client sent after its request head) and sends it to
//! the request's [`Downstream`]. HTTP/2 requests keep hyper's own upgrade.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Method, Request, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// The client's side of an upgraded connection.
pub(crate) trait UpgradedIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpgradedIo for T {}

/// The request's end of an upgrade the server hands over.
type Handover = oneshot::Receiver<Box<dyn UpgradedIo>>;

/// Where the client's side of an upgrade will come from, taken from the request before it
/// is taken apart.
pub(crate) enum Downstream {
    Hyper(hyper::upgrade::OnUpgrade),
    Server(Handover),
}

impl Downstream {
    pub(crate) fn take<B>(req: &mut Request<B>) -> Self {
        let offered = req
            .extensions_mut()
            .remove::<Offered>()
            .and_then(|offered| lock(&offered.0).take());
        match offered {
            Some(receiver) => Self::Server(receiver),
            None => Self::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// The upgraded connection, once the `101` has been written to the client.
    pub(crate) async fn resolve(self) -> io::Result<Box<dyn UpgradedIo>> {
        match self {
            Self::Hyper(upgrade) => match upgrade.await {
                Ok(upgraded) => Ok(Box::new(TokioIo::new(upgraded))),
                Err(err) => Err(io::Error::other(err)),
            },
            Self::Server(receiver) => receiver.await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client connection ended before the upgrade",
                )
            }),
        }
    }
}

/// The request's end of an offered upgrade (extensions must be `Clone`).
#[derive(Clone)]
struct Offered(Arc<Mutex<Option<Handover>>>);

/// The connection's end: the sender of the last request that asked for an upgrade.
#[derive(Default)]
pub(super) struct UpgradeSlot(Mutex<Option<oneshot::Sender<Box<dyn UpgradedIo>>>>);

impl UpgradeSlot {
    /// Offers an upgrade to a request that asks for one, as hyper's HTTP/1.1 server
    /// understands it: `CONNECT`, or an `Upgrade` header on HTTP/1.1.
    pub(super) fn offer<B>(&self, req: &mut Request<B>) {
        let asks = req.method() == Method::CONNECT
            || (req.version() == Version::HTTP_11
                && req.headers().contains_key(http::header::UPGRADE));
        if !asks {
            return;
        }
        let (sender, receiver) = oneshot::channel();
        *lock(&self.0) = Some(sender);
        req.extensions_mut()
            .insert(Offered(Arc::new(Mutex::new(Some(receiver)))));
    }

    /// Hands `io` to the request that asked for an upgrade, if one did and still waits;
    /// otherwise gives it back.
    pub(super) fn fulfil(&self, io: Box<dyn UpgradedIo>) -> Result<(), Box<dyn UpgradedIo>> {
        match lock(&self.0).take() {
            Some(sender) => sender.send(io),
            None => Err(io),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
