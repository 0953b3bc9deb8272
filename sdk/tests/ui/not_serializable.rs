struct Handle(std::fs::File);

#[flotilla::task]
async fn use_handle(h: Handle) -> Result<u32, String> {
    let _ = h;
    Ok(1)
}

fn main() {}
