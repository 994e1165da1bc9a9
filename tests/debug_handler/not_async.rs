use palisade::debug_handler;

#[debug_handler]
fn ping() -> &'static str {
    "pong"
}

#[debug_handler(status = 200)]
async fn pong() {}

fn main() {}
