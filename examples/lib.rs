//! Runnable examples of Flotilla: `cargo run --example NAME`.
