use palisade::debug_handler;

#[debug_handler]
async fn count() -> u64 {
    let local = std::rc::Rc::new(1);
    tokio::task::yield_now().await;
    *local
}

fn main() {}
