//! A health endpoint over HTTP with axum, NestJS terminus style: the report comes from the
//! circuit breaker of a client calling another service and from a check of your own, and the
//! endpoint answers 200 while everything is up and 503 once the breaker opens.
//!
//! ```sh
//! cargo run --example health_http
//! ```
//!
//! It starts an `inventory` service on TCP, a client to it wearing a breaker, and an axum server
//! with two routes: `/health` (a handler reading `health.report()`) and `/health/service` (the
//! `Health` value itself as a tower service, mapped to a response). It asks both, stops the
//! inventory service, lets the breaker open, and asks again.

use axum::Json;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::routing::get;
use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::health::{Health, HealthReport};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Payload, Router, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

/// The HTTP response for a report: terminus's body (in terminus's key order), 200 or 503.
fn respond(report: HealthReport) -> (StatusCode, Json<HealthReport>) {
    let status =
        StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(report))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The service this one depends on.
    let inventory = TcpServer::bind("127.0.0.1:0")
        .await?
        .serve(Server::new(Router::new().message(
            "stock",
            |Payload(sku): Payload<String>| async move { sku.len() as u64 },
        )))
        .await?;
    let inventory_addr = inventory.local_addr().expect("a TCP server has an address");

    // A client to it with a breaker: two failures in a row open it for a minute.
    let client = Client::builder()
        .timeout(Duration::from_millis(500))
        .circuit_breaker(
            CircuitBreakerConfig::new("inventory")
                .max_failures(2)
                .reset_timeout(Duration::from_secs(60)),
        )
        .connect(TcpTransport::new(inventory_addr.to_string()))
        .await?;
    let breaker = client
        .circuit_breaker()
        .expect("the client was built with a breaker")
        .clone();

    // A check of your own: here, a flag a shutdown hook would clear.
    let accepting = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&accepting);
    let health = Health::new().breaker(breaker).check("accepting", move || {
        if flag.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("shutting down".to_owned())
        }
    });

    // Two routes: a handler, and the `Health` tower service itself.
    let for_handler = health.clone();
    let app = axum::Router::new()
        .route(
            "/health",
            get(move || {
                let health = for_handler.clone();
                async move { respond(health.report()) }
            }),
        )
        .route_service(
            "/health/service",
            ServiceExt::<Request>::map_response(health, respond),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let stock: u64 = client.send("stock", "apple").await?;
    println!("inventory says {stock} in stock");
    for path in ["/health", "/health/service"] {
        let (status, body) = get_http(http, path).await?;
        println!("GET {path} -> {status} {body}");
        assert_eq!(status, 200, "everything is up");
    }

    // The inventory service goes away; two failed calls open the breaker.
    inventory.shutdown().await;
    for _ in 0..2 {
        let failed = client.send::<u64>("stock", "apple").await;
        println!("calling inventory: {}", failed.unwrap_err());
    }
    for path in ["/health", "/health/service"] {
        let (status, body) = get_http(http, path).await?;
        println!("GET {path} -> {status} {body}");
        assert_eq!(status, 503, "the breaker is open");
    }
    Ok(())
}

/// A plain HTTP/1.1 GET: the status code and the body.
async fn get_http(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
