// A tower policy given to palisade's retry without saying which results are final.
use palisade::retry::RetryLayer;
use tower::{Layer, Service};

fn serve<S: Service<()>>(_: S) {}

#[derive(Clone)]
struct Once;

impl tower::retry::Policy<(), (), std::io::Error> for Once {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _: &mut (), _: &mut Result<(), std::io::Error>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, _: &()) -> Option<()> {
        Some(())
    }
}

fn main() {
    let inner = tower::service_fn(|()| async { Ok::<(), std::io::Error>(()) });
    serve(RetryLayer::new(Once).layer(inner));
}
