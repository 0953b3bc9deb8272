//! # flotilla-macros
//!
//! The procedural macros of the Flotilla SDK, re-exported by the `flotilla` crate:
//! `#[task(...)]` and `#[flow(...)]` turn plain `async fn`s into tasks and flows.

mod attrs;
mod expand;

use proc_macro::TokenStream;

/// Makes an `async fn` returning `Result<T, E>` a task. See the `flotilla` crate's docs.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Makes an `async fn` returning `Result<T, E>` a flow. See the `flotilla` crate's docs.
#[proc_macro_attribute]
pub fn flow(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::flow(attr.into(), item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}
