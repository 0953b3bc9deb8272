#[flotilla::task(retries = 3, retry_delay = "soon")]
async fn when() -> Result<u32, String> {
    Ok(1)
}

#[flotilla::flow(resume = "yes")]
async fn resumable() -> Result<u32, String> {
    Ok(1)
}

fn main() {}
