//! Server-sent events: a producer task writes `data: …` frames into a channel that the
//! response body reads. When the client goes away the body is dropped, the producer sees the
//! channel close, stops, and drops its engine requests (which cancels them).

use std::convert::Infallible;
use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use tokio::sync::mpsc;

/// Frames buffered between the producer and a slow client.
const BUFFER: usize = 64;

pub struct Sender {
    tx: mpsc::Sender<Bytes>,
}

impl Sender {
    /// Sends `data: <json>`; false when the client has gone.
    pub async fn send_json(&self, v: &serde_json::Value) -> bool {
        self.tx
            .send(Bytes::from(format!("data: {v}\n\n")))
            .await
            .is_ok()
    }

    /// The OpenAI end-of-stream marker.
    pub async fn send_done(&self) -> bool {
        self.tx
            .send(Bytes::from_static(b"data: [DONE]\n\n"))
            .await
            .is_ok()
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Starts `produce` on the runtime and returns the streaming response it feeds.
pub fn response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Sender) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    tokio::spawn(produce(Sender { tx }));
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
