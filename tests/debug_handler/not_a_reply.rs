use palisade::debug_handler;
use palisade::rpc::Payload;

struct User {
    id: u64,
}

#[debug_handler]
async fn get_user(Payload(id): Payload<u64>) -> User {
    User { id }
}

fn main() {}
