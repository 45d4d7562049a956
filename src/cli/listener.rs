//! The HTTP accept loop of `serve`: axum's router on hyper's HTTP/1 and HTTP/2 server, with the
//! connection limits `axum::serve` does not set.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never fires: a client that
//! sends one header byte a minute holds a connection (and a task) forever, and enough of them
//! exhaust the file descriptors. Here every connection must send a request's headers within
//! [`ConnectionLimits::header_read_timeout`] (also between keep-alive requests), and at most
//! [`ConnectionLimits::max_connections`] are open at once; beyond that, new connections wait in
//! the kernel's backlog. Body read time is bounded per request by the body reader
//! (`serve`'s `read_body`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Bounds on what one client connection may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time to receive a request's head, from the connection's start or the previous response.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Serve `router` on `listener` until `shutdown` completes; then stop accepting, ask every open
/// connection to finish its request in flight, and return once they have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Dropped at shutdown: each connection task sees it close and shuts down gracefully.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit?,
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|request: axum::http::Request<Incoming>| request.map(Body::new)),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(limits.header_read_timeout))
                .keep_alive_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = stop.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
        // Reap finished connections so the set does not grow with the server's lifetime.
        while tasks.try_join_next().is_some() {}
    }
    drop(stop_tx);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
