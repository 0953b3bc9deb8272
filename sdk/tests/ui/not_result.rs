#[flotilla::flow]
async fn plain() -> u32 {
    1
}

fn main() {}
