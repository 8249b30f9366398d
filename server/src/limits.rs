//! Transport limits: how much one client, and all clients together, may ask
//! of the server before it says no.
//!
//! Several of tonic's and hyper's defaults are "no limit" (concurrent
//! connections, in-flight calls, encoded message size, HTTP/2 keepalive), so a
//! single broken or hostile client could otherwise grow the server without
//! bound. Every limit here is explicit, has a flag in `jobd`, and a default
//! sized for one machine. [`ServerLimits`] is the whole set; `server.rs`
//! applies it to the tonic server, and the two pieces tonic has no knob for
//! live here:
//!
//! - a cap on concurrent connections (`limited_incoming`): a connection
//!   beyond it is closed at once, so a flood fails fast instead of filling the
//!   kernel's accept backlog where well-behaved clients would wait behind it;
//! - a global in-flight limit for `jobd.v1.JobService` (`InFlightLimit`):
//!   past it a call is answered `RESOURCE_EXHAUSTED` immediately (a gRPC
//!   status in a 200 response, never an HTTP 503), not queued. Health and
//!   reflection are not wrapped, so probes still answer under load.

use std::{
    convert::Infallible,
    io,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt as _, Stream, StreamExt as _, future::BoxFuture};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{
    Status,
    server::NamedService,
    transport::server::{Connected, TcpConnectInfo},
};

/// Every transport limit of the server. `Default` holds the `jobd` flag
/// defaults; [`crate::serve`] uses them.
///
/// ```
/// let limits = jobd::ServerLimits {
///     max_connections: 64,
///     ..jobd::ServerLimits::default()
/// };
/// assert_eq!(limits.max_in_flight, 4096);
/// ```
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Concurrent TCP connections. One more is closed as soon as it is
    /// accepted (each connection costs buffers and HTTP/2 state, so a flood
    /// of idle connections is a memory attack of its own).
    pub max_connections: usize,
    /// `jobd.v1.JobService` calls being handled at once, over all
    /// connections. Past it a call is answered `RESOURCE_EXHAUSTED` at once:
    /// shedding keeps latency bounded where queueing would hide overload.
    /// Blocked `Result` and `Wait` calls count too, and so does an open
    /// `Map` stream, for as long as it is open.
    pub max_in_flight: usize,
    /// HTTP/2 streams a client may open on one connection (the
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the server announces; hyper's
    /// default is 200, tonic passes "unset").
    pub max_concurrent_streams: u32,
    /// Calls handled at once on one connection (all services); past it a
    /// call is answered `RESOURCE_EXHAUSTED` at once, so one greedy
    /// connection hits its own ceiling before the global one.
    pub max_in_flight_per_connection: usize,
    /// Largest header list (HPACK-decoded) a request may carry, in bytes.
    pub max_header_list_size: u32,
    /// Streams the server may reset for protocol errors on one connection
    /// before it closes the connection (defence against "reset flood"
    /// attacks, CVE-2023-44487 and its cousins).
    pub max_local_error_reset_streams: usize,
    /// Streams a client may open and reset before the server has accepted
    /// them (the "rapid reset" attack, CVE-2023-44487); past it the
    /// connection is closed.
    pub max_pending_accept_reset_streams: usize,
    /// How often the server pings an idle HTTP/2 connection, so dead peers
    /// are found and their connection slots given back.
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is
    /// closed.
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive idle time on accepted sockets: finds peers that vanished
    /// without a FIN even when HTTP/2 pings are not flowing.
    pub tcp_keepalive: Duration,
    /// Largest request message `JobService` decodes, in bytes. A larger one
    /// is refused before it is decoded (tonic answers `OUT_OF_RANGE`), so it
    /// never creates a job.
    pub max_decoding_message_size: usize,
    /// Largest response message `JobService` encodes, in bytes (tonic's own
    /// default is unlimited). Bounds what one large job result can make the
    /// server allocate per answer.
    pub max_encoding_message_size: usize,
    /// The longest one `Result` or `Wait` call waits, whatever timeout it
    /// asks for (or none): then `Result` answers `DEADLINE_EXCEEDED` and
    /// `Wait` its done/not-done split, and the client asks again (the Rust
    /// client does so by itself). Bounds how long a call holds its
    /// in-flight slot and stream, and lets proxies with idle timeouts
    /// sit in between.
    pub max_wait: Duration,
    /// `Result` and `Wait` calls in progress at once; one more is answered
    /// `RESOURCE_EXHAUSTED` at once. Kept below `max_in_flight`, so that
    /// blocked waiters cannot take every slot from Submit and the rest.
    pub max_waiters: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_in_flight: 4096,
            max_concurrent_streams: 256,
            max_in_flight_per_connection: 256,
            max_header_list_size: 16 * 1024,
            max_local_error_reset_streams: 1024,
            max_pending_accept_reset_streams: 20,
            http2_keepalive_interval: Duration::from_secs(60),
            http2_keepalive_timeout: Duration::from_secs(20),
            tcp_keepalive: Duration::from_secs(60),
            max_decoding_message_size: 4 * 1024 * 1024,
            max_encoding_message_size: 16 * 1024 * 1024,
            max_wait: Duration::from_secs(60),
            max_waiters: 3072,
        }
    }
}

/// Wraps a gRPC service so that at most `max` of its calls run at once; one
/// more is answered `RESOURCE_EXHAUSTED` without reaching the service.
///
/// The permit is held until the response future resolves. For unary calls
/// tonic resolves it after the handler has finished, so the permit covers
/// the whole call. A streaming handler returns as soon as its stream is set
/// up, so the permit also rides in the request's extensions as an
/// [`InFlightPermit`]: `Map`, whose stream submits and runs jobs, keeps that
/// clone for the life of its stream, and the slot is freed when the last
/// clone drops. `Watch` does not: watch streams are long-lived and mostly
/// idle, and have a cap of their own (`--max-watchers`, enforced by the
/// engine for the stream's whole life), so that idle watchers can never
/// starve unary calls of in-flight slots.
#[derive(Debug, Clone)]
pub(crate) struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

impl<S> InFlightLimit<S> {
    pub(crate) fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for InFlightLimit<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let permit = InFlightPermit {
                    _slot: Arc::new(permit),
                };
                request.extensions_mut().insert(permit.clone());
                let call = self.inner.call(request);
                Box::pin(async move {
                    // A handler that panics must not take its message (which
                    // may name paths or internals) to the client, nor end as
                    // a bare stream reset: it is answered INTERNAL, and the
                    // panic is logged here.
                    let response = AssertUnwindSafe(call).catch_unwind().await;
                    drop(permit);
                    response.unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(%message, "a JobService handler panicked; answered INTERNAL");
                        Ok(Status::internal("internal error (see the server log)").into_http())
                    })
                })
            }
            Err(_) => {
                tracing::debug!(max = self.max, "in-flight limit reached: call shed");
                // `into_http` puts grpc-status 8 in the headers of a 200
                // response ("trailers-only"), which every gRPC client reads
                // as RESOURCE_EXHAUSTED.
                let status = Status::resource_exhausted(format!(
                    "server busy: {} calls in flight; retry later",
                    self.max
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// A share of one call's in-flight slot. Streaming handlers hold it (from
/// the request's extensions) until their stream ends, so a long stream
/// counts against `max_in_flight` for as long as it is open.
#[derive(Debug, Clone)]
pub(crate) struct InFlightPermit {
    // Held, never read: the last clone dropped frees the slot.
    _slot: Arc<OwnedSemaphorePermit>,
}

impl<S: NamedService> NamedService for InFlightLimit<S> {
    const NAME: &'static str = S::NAME;
}

/// Accepted connections, at most `max` open at once: each carries a permit
/// that is given back when hyper drops the connection; a connection accepted
/// while none is free is closed at once.
pub(crate) fn limited_incoming<I>(
    incoming: I,
    max: usize,
) -> impl Stream<Item = io::Result<LimitedConnection>> + Send + 'static
where
    I: Stream<Item = io::Result<TcpStream>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |accepted| {
        let answer = match accepted {
            Ok(stream) => match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => Some(Ok(LimitedConnection {
                    stream,
                    _permit: permit,
                })),
                Err(_) => {
                    // Dropping the socket closes it: the client sees the
                    // connection end before any HTTP/2 exchange and can retry.
                    tracing::debug!(
                        max,
                        peer = ?stream.peer_addr().ok(),
                        "connection limit reached: connection closed"
                    );
                    None
                }
            },
            // An accept error (e.g. out of file descriptors) is tonic's to
            // log and survive.
            Err(err) => Some(Err(err)),
        };
        std::future::ready(answer)
    })
}

/// A TCP connection holding one of the connection cap's permits.
#[derive(Debug)]
pub(crate) struct LimitedConnection {
    stream: TcpStream,
    // Held, never read: dropping the connection frees the slot.
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, future::Future, pin::Pin};

    use tower::Service as _;

    use super::*;

    /// A service whose handler panics with an internal detail.
    #[derive(Clone)]
    struct Panics;

    impl tower::Service<http::Request<()>> for Panics {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<()>) -> Self::Future {
            Box::pin(async { panic!("cannot open /var/lib/jobd/secret.db") })
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal_without_its_message() {
        let mut limited = InFlightLimit::new(Panics, 1);
        let response = limited.call(http::Request::new(())).await.unwrap();
        let status = Status::from_header_map(response.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("/var/lib"), "{status:?}");
        // The permit came back: the next call is not shed.
        let again = limited.call(http::Request::new(())).await.unwrap();
        let status = Status::from_header_map(again.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
