//! Accepts connections and serves the routes on them with bounded waits: a client must send
//! a request's headers within `--timeout-keep-alive` of connecting or of its previous
//! response (so a half-sent header, or an idle keep-alive connection, is closed), and its
//! body within `--timeout-request-body` ([`body_deadline`], a layer of the routes).
//!
//! `axum::serve` has no timers; this is its accept loop over hyper-util with hyper's header
//! read timeout, which runs from the moment the connection waits for a request head.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::error::ApiError;
use super::{AppState, MAX_BODY_BYTES};

/// The HTTP timeouts (`--timeout-keep-alive`, `--timeout-request-body`).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From connecting, or from the previous response, to the end of a request's headers.
    pub keep_alive: Duration,
    /// From the headers to the end of the body.
    pub request_body: Duration,
}

impl Default for Timeouts {
    /// uvicorn's (and so vLLM's) 5 s keep-alive; 60 s for a body, 1 MB/s for the largest.
    fn default() -> Self {
        Timeouts {
            keep_alive: Duration::from_secs(5),
            request_body: Duration::from_secs(60),
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets open connections finish
/// their requests (closing idle ones) for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    // HTTP/1.1 only, as vLLM's uvicorn: detecting HTTP/2 first waits for bytes without a
    // timer, so a connection that sent nothing would stay open.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.keep_alive);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|r: Request<Incoming>| r.map(Body::new)),
        );
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // hyper's header timer does not cover a connection that never sends a byte: one
            // that sends none is closed here. (A peek, not `readable()`, which reports a new
            // socket ready before anything arrived.)
            let mut byte = [0u8; 1];
            let first = tokio::time::timeout(timeouts.keep_alive, stream.peek(&mut byte));
            if !matches!(first.await, Ok(Ok(1..))) {
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!("connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

/// Reads the whole body within `--timeout-request-body` before the route sees it: a client
/// that sends its headers and then the body slowly (or never) gets a 408 instead of holding a
/// handler, and one that sends more than the routes take a 413 as soon as it has.
pub(super) async fn body_deadline(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = st.timeouts.request_body;
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(limit, to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_long = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_long {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_body",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("cannot read the request body: {e}"),
                )
            }
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s (--timeout-request-body)",
                    limit.as_secs_f64()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
