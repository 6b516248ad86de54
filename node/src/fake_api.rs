//! A fake API server on loopback for unit tests: each request is answered by a function of
//! its method and path, and every request is recorded as `METHOD PATH BODY`.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use serde_json::Value;

/// The requests a [`serve`]d fake API has seen, each as `METHOD PATH BODY`.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Serves `answer(method, path)` → (status, JSON body) on a loopback port: its URL and the
/// requests seen.
pub async fn serve(
    answer: impl Fn(&str, &str) -> (u16, Value) + Send + Sync + 'static,
) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let (log, answer) = (seen.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (log, answer) = (log.clone(), answer.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (log, answer) = (log.clone(), answer.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        log.lock().unwrap().push(format!(
                            "{method} {path} {}",
                            String::from_utf8_lossy(&body)
                        ));
                        let (code, body) = answer(&method, &path);
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from(
                                    body.to_string(),
                                )))
                                .expect("a valid response"),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), svc),
            );
        }
    });
    (url, seen)
}

/// A `Status` failure with `code`, as the API answers one.
pub fn status(code: u16) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "code": code, "message": "fake"})
}
