//! Typed contracts: a pattern declared once with its request and reply types, used by both the
//! client and the handler, so that the two cannot disagree (beyond NestJS, where the types live
//! on each side separately). Optional: string and object patterns remain.

use super::{Client, Handler, Pattern, Payload, Router, RpcError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use tower::BoxError;

/// A message pattern together with the types of its request and its reply. Declare it in a
/// crate both sides depend on; the server registers a handler with [`Router::contract`], which
/// only accepts a handler taking `Payload<Self::Request>` first and answering
/// `Result<Self::Reply, _>`, and the client calls it with [`Client::invoke`].
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Contract, Pattern, Payload, Router, RpcError, Server};
/// use serde::{Deserialize, Serialize};
///
/// /// `get-user`: a user by id.
/// struct GetUser;
/// #[derive(Serialize, Deserialize)]
/// struct UserId(u64);
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct User { id: u64, name: String }
///
/// impl Contract for GetUser {
///     type Request = UserId;
///     type Reply = User;
///     fn pattern() -> Pattern { "get-user".into() }
/// }
///
/// async fn get_user(Payload(UserId(id)): Payload<UserId>) -> Result<User, RpcError> {
///     Ok(User { id, name: format!("user{id}") })
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let transport = MemoryTransport::new();
/// let _server = Server::new(Router::new().contract::<GetUser, _, _>(get_user)).serve(&transport).await?;
/// let client = Client::builder().connect(transport).await?;
/// let user = client.invoke::<GetUser>(&UserId(7)).await?;
/// assert_eq!(user, User { id: 7, name: "user7".into() });
/// # Ok(()) }
/// ```
///
/// A handler whose reply is not the contract's does not compile:
///
/// ```compile_fail
/// # use palisade::rpc::{Contract, Pattern, Payload, Router, RpcError};
/// struct GetUser;
/// impl Contract for GetUser {
///     type Request = u64;
///     type Reply = String;
///     fn pattern() -> Pattern { "get-user".into() }
/// }
/// async fn get_user(Payload(id): Payload<u64>) -> Result<u64, RpcError> { Ok(id) } // not a String
/// let router = Router::new().contract::<GetUser, _, _>(get_user);
/// ```
pub trait Contract {
    /// What the caller sends (the handler's `Payload`).
    type Request: Serialize + DeserializeOwned;
    /// What the handler answers.
    type Reply: Serialize + DeserializeOwned;
    /// The pattern (a string, or an object pattern from `serde_json::json!`).
    fn pattern() -> Pattern;
}

/// Implemented by the handlers that fulfil contract `C`: functions taking `Payload<C::Request>`
/// as their first argument (any extractors after it) and answering `Result<C::Reply, E>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not fulfil the contract `{C}`",
    label = "not a handler of this contract",
    note = "a contract's handler takes `Payload<C::Request>` as its first argument and returns `Result<C::Reply, E>`"
)]
pub trait ContractHandler<C, Args> {}

macro_rules! contract_handler_for_fn {
    ($($arg:ident),*) => {
        impl<C, F, Fut, E, $($arg,)*> ContractHandler<C, (Payload<C::Request>, $($arg,)*)> for F
        where
            C: Contract,
            F: FnOnce(Payload<C::Request>, $($arg),*) -> Fut,
            Fut: Future<Output = Result<C::Reply, E>>,
            E: Into<BoxError>,
        {
        }
    };
}

contract_handler_for_fn!();
contract_handler_for_fn!(A2);
contract_handler_for_fn!(A2, A3);
contract_handler_for_fn!(A2, A3, A4);
contract_handler_for_fn!(A2, A3, A4, A5);

impl<S> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Handles requests for contract `C`'s pattern with `handler`, which must take
    /// `Payload<C::Request>` and answer `Result<C::Reply, _>`; see [`Contract`].
    pub fn contract<C, H, Args>(self, handler: H) -> Self
    where
        C: Contract,
        H: Handler<Args, S> + ContractHandler<C, Args>,
        Args: 'static,
    {
        self.message(C::pattern(), handler)
    }
}

impl Client {
    /// Sends contract `C`'s request and decodes its reply as `C::Reply`; see [`Contract`].
    pub async fn invoke<C: Contract>(&self, request: &C::Request) -> Result<C::Reply, RpcError> {
        self.send(C::pattern(), request).await
    }
}
