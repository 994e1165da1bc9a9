//! Calls the user service (`user_service.rs`, or a NestJS service with the same patterns) over TCP
//! with a deadline, retries and a circuit breaker.
//!
//! ```text
//! cargo run --example user_service &      # or any NestJS TCP microservice on port 3000
//! cargo run --example auth_client
//! ```

use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::retry::RetryPolicy;
use palisade::rpc::transport::tcp::TcpTransport;
use palisade::rpc::{Client, RpcError};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Session {
    token: String,
    user_id: u64,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct User {
    id: u64,
    username: String,
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), RpcError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let users = Client::builder()
        .timeout(Duration::from_secs(2))
        .retry(RetryPolicy::new(3))
        .circuit_breaker(CircuitBreakerConfig::new("user-service").max_failures(5))
        .attempt_timeout(Duration::from_millis(500))
        .connect(TcpTransport::new(addr.clone()))
        .await?;

    let session: Session = match users
        .send("login", &json!({"username": "ann", "password": "secret"}))
        .await
    {
        Ok(session) => session,
        Err(error) if error.code() == palisade::rpc::Code::Unavailable => {
            eprintln!(
                "cannot reach the user service at {addr}: {error}\nstart it with `cargo run --example user_service`"
            );
            std::process::exit(1);
        }
        Err(error) => return Err(error),
    };
    println!("logged in: {session:?}");

    let wrong = users
        .send::<Session>("login", &json!({"username": "ann", "password": "guess"}))
        .await
        .unwrap_err();
    println!(
        "wrong password: {wrong} (domain code {:?})",
        wrong.domain_code()
    );

    let ann: User = users
        .send("get-user", &json!({"id": session.user_id}))
        .await?;
    println!("get-user: {ann:?}");

    let name = format!("bob{}", std::process::id());
    let bob: User = users
        .send(
            "create-user",
            &json!({"username": name, "email": "bob@example.com"}),
        )
        .await?;
    println!("create-user: {bob:?}");
    users.emit("user-created", &bob.username).await?;

    let missing = users
        .send::<User>("get-user", &json!({"id": 999}))
        .await
        .unwrap_err();
    println!("get-user 999: {missing}");
    let unknown = users
        .send::<User>("delete-user", &json!({"id": 1}))
        .await
        .unwrap_err();
    println!("delete-user: {unknown}");
    Ok(())
}
