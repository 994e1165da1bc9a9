use palisade::debug_handler;

#[derive(serde::Deserialize)]
struct NewUser {
    name: String,
}

#[debug_handler]
async fn create_user(user: NewUser) -> String {
    user.name
}

fn main() {}
