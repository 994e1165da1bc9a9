use palisade::debug_handler;
use palisade::rpc::State;

#[derive(Clone)]
struct AppState;

#[derive(Clone)]
struct Other;

#[debug_handler(state = AppState)]
async fn handler(State(_other): State<Other>) {}

fn main() {}
