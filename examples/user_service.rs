//! A user service over NestJS-compatible TCP: `login`, `get-user`, `create-user`, and a
//! `user-created` event. A NestJS `ClientProxy` (Transport.TCP) can call it as well as palisade's
//! client (see `auth_client.rs`).
//!
//! ```text
//! cargo run --example user_service               # listens on 127.0.0.1:3000
//! cargo run --example user_service -- 127.0.0.1:4000
//! ```
//! Stops gracefully on Ctrl-C, draining requests in flight.

use palisade::builder::ServiceBuilderExt;
use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::rpc::transport::tcp::TcpServer;
use palisade::rpc::{Payload, Router, RpcError, Server, handler_service};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    username: String,
    email: String,
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

#[derive(Serialize)]
struct Session {
    token: String,
    user_id: u64,
}

#[derive(Deserialize)]
struct GetUser {
    id: u64,
}

#[derive(Deserialize)]
struct CreateUser {
    username: String,
    email: String,
}

type Users = Arc<Mutex<HashMap<u64, User>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let users: Users = Arc::new(Mutex::new(HashMap::from([(
        1,
        User {
            id: 1,
            username: "ann".into(),
            email: "ann@example.com".into(),
        },
    )])));

    let (for_login, for_get, for_create) = (users.clone(), users.clone(), users.clone());
    let router = Router::new()
        .message("login", move |Payload(login): Payload<Login>| {
            let users = for_login.clone();
            async move {
                let users = users.lock().unwrap();
                let user = users.values().find(|u| u.username == login.username);
                match user {
                    // A demo check; a real service verifies a password hash.
                    Some(user) if login.password == "secret" => Ok(Session {
                        token: format!("token-{}", user.id),
                        user_id: user.id,
                    }),
                    _ => Err(RpcError::exception_object(serde_json::json!({
                        "code": "INVALID_CREDENTIALS",
                        "message": "wrong username or password",
                    }))),
                }
            }
        })
        .message("get-user", move |Payload(req): Payload<GetUser>| {
            let users = for_get.clone();
            async move {
                users.lock().unwrap().get(&req.id).cloned().ok_or_else(|| {
                    RpcError::exception_object(serde_json::json!({
                        "code": "USER_NOT_FOUND",
                        "message": format!("user {} not found", req.id),
                    }))
                })
            }
        })
        // create-user writes to a store that may be down: a breaker guards this handler alone,
        // like NestJS's @CircuitBreaker on one @MessagePattern.
        .message(
            "create-user",
            tower::ServiceBuilder::new()
                .circuit_breaker(
                    CircuitBreakerConfig::new("user-store")
                        .ttl(Duration::from_secs(5))
                        .max_failures(3)
                        .reset_timeout(Duration::from_secs(10)),
                )
                .service(handler_service(move |Payload(req): Payload<CreateUser>| {
                    let users = for_create.clone();
                    async move {
                        let mut users = users.lock().unwrap();
                        if users.values().any(|u| u.username == req.username) {
                            return Err(RpcError::new(
                                palisade::rpc::Code::AlreadyExists,
                                format!("{} exists", req.username),
                            ));
                        }
                        let id = users.keys().max().copied().unwrap_or(0) + 1;
                        let user = User {
                            id,
                            username: req.username,
                            email: req.email,
                        };
                        users.insert(id, user.clone());
                        Ok(user)
                    }
                })),
        )
        .event(
            "user-created",
            |Payload(user): Payload<serde_json::Value>| async move {
                tracing::info!(%user, "welcome mail queued");
            },
        );

    let server = Server::new(router)
        .grace_period(Duration::from_secs(5))
        .serve(TcpServer::bind(&addr).await?)
        .await?;
    tracing::info!(%addr, "user service listening (Ctrl-C to stop)");
    tokio::signal::ctrl_c().await?;
    let report = server.shutdown().await;
    tracing::info!(?report, "stopped");
    Ok(())
}
