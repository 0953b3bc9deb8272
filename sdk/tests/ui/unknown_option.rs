#[flotilla::task(retires = 3)]
async fn typo() -> Result<u32, String> {
    Ok(1)
}

fn main() {}
