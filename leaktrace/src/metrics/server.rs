//! `GET /metrics` over HTTP/1.1, on the current-thread tokio runtime that also drains the ring
//! buffer. Nothing here may wait on a client: sockets are non-blocking, a response is bytes
//! encoded at the last report, and a client that stalls (sends half a request, or never reads
//! the answer) holds one of a bounded number of connections until a timeout closes it, while
//! the event loop runs on.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::metrics::Exporter;

/// Connections served at once; more wait in the listen backlog. Prometheus keeps one per
/// target; the bound only matters against clients that hold connections and do nothing.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is asked to close after this long (Prometheus opens another at its next
/// scrape), and closed this much later whatever it is doing (a client that never reads).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const CLOSE_GRACE: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves scrapes until the runtime is dropped (the trace ended).
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, or a connection reset before it was accepted: try
            // again a little later rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let exporter = Arc::clone(&exporter);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let response = respond(&request, &exporter);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            // Errors are the client's (a reset, a malformed request, a timeout): nothing to
            // report, the connection is simply closed.
            tokio::select! {
                _ = connection.as_mut() => {}
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
                }
            }
        });
    }
}

fn respond<B>(request: &Request<B>, exporter: &Exporter) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "leaktrace serves its metrics at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let exposition = exporter.exposition();
    let accept = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let (content_type, body) = if wants_openmetrics(&accept) {
        (OPENMETRICS, exposition.openmetrics.clone())
    } else {
        (
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            exposition.text.clone(),
        )
    };
    // hyper leaves the body out of a HEAD response and keeps its length.
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether an `Accept` header prefers OpenMetrics to the Prometheus text format: it names
/// `application/openmetrics-text` with a quality above zero, and at least as high as what it
/// gives `text/plain` (or a wildcard that covers it). Prometheus asks for OpenMetrics first;
/// browsers and curl get the text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut openmetrics: f32 = 0.0;
    let mut text: f32 = 0.0;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok())
            .filter(|q| (0.0..=1.0).contains(q));
        let Some(quality) = quality else {
            continue;
        };
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
            "text/plain" | "text/*" | "*/*" => text = text.max(quality),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_text_format() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(wants_openmetrics(
            "text/plain;q=0.5, Application/OpenMetrics-Text; version=1.0.0; q=0.9"
        ));
        for text in [
            "",
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "text/plain;q=1, application/openmetrics-text;q=0.5",
            "application/openmetrics-text;q=0",
            // Malformed qualities are ignored, not taken for 1.
            "application/openmetrics-text;q=high, text/plain;q=0.1",
            "application/openmetrics-text;q=2",
            ",,;;==",
            "application/openmetrics-textual",
        ] {
            assert!(!wants_openmetrics(text), "{text}");
        }
    }

    fn request(method: Method, path: &str, accept: Option<&str>) -> Request<()> {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn metrics_in_the_format_asked_for_and_nothing_else() {
        let exporter = Exporter::default();
        let text = respond(&request(Method::GET, "/metrics", None), &exporter);
        assert_eq!(text.status(), StatusCode::OK);
        assert_eq!(
            text.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let openmetrics = respond(
            &request(
                Method::GET,
                "/metrics?x=1",
                Some("application/openmetrics-text;version=1.0.0"),
            ),
            &exporter,
        );
        assert_eq!(openmetrics.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(
            respond(&request(Method::HEAD, "/metrics", None), &exporter).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&request(Method::GET, "/", None), &exporter).status(),
            StatusCode::NOT_FOUND
        );
        let post = respond(&request(Method::POST, "/metrics", None), &exporter);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }
}
