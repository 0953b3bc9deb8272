//! The expansions of `#[task]` and `#[flow]`.
//!
//! Both keep the function's body as a hidden `async fn` and put, in its name's place, a value
//! of a marker type that:
//! - implements the SDK's `TaskDef` / `FlowDef` (name, options, body);
//! - dereferences to a plain function pointer, so that `my_task(a, b)` still reads as a call
//!   (inside a flow it runs a task run, elsewhere it runs the body directly);
//! - has `submit`, `map` and `wait_for` (tasks).

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::attrs::{self, Kind, Options};

struct Signature {
    names: Vec<syn::Ident>,
    types: Vec<Type>,
    ok: Type,
}

fn check(kind: Kind, f: &ItemFn) -> syn::Result<Signature> {
    let what = match kind {
        Kind::Task => "task",
        Kind::Flow => "flow",
    };
    if f.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            f.sig.fn_token.span(),
            format!(
                "#[{what}] goes on an `async fn`: write `async fn {}(...)`",
                f.sig.ident
            ),
        ));
    }
    if !f.sig.generics.params.is_empty() || f.sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            f.sig.generics.span(),
            format!(
                "a {what} cannot be generic: its arguments are stored and sent, so give them concrete types"
            ),
        ));
    }
    let mut names = Vec::new();
    let mut types = Vec::new();
    for arg in &f.sig.inputs {
        match arg {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    format!("a {what} is a free function; it cannot take `self`"),
                ));
            }
            FnArg::Typed(t) => {
                let Pat::Ident(id) = &*t.pat else {
                    return Err(syn::Error::new(
                        t.pat.span(),
                        format!("{what} arguments must be plain names (`x: T`), not patterns"),
                    ));
                };
                if let Type::Reference(r) = &*t.ty {
                    return Err(syn::Error::new(
                        r.span(),
                        format!(
                            "{what} arguments are stored and sent, so they must be owned: take `{}` by value",
                            quote!(#r.elem)
                        ),
                    ));
                }
                if let Type::ImplTrait(i) = &*t.ty {
                    return Err(syn::Error::new(
                        i.span(),
                        format!("{what} arguments need concrete types, not `impl Trait`"),
                    ));
                }
                names.push(id.ident.clone());
                types.push((*t.ty).clone());
            }
        }
    }
    let ok = match &f.sig.output {
        ReturnType::Type(_, ty) => result_ok(ty),
        ReturnType::Default => None,
    };
    let Some(ok) = ok else {
        return Err(syn::Error::new(
            f.sig.output.span(),
            format!("a {what} returns `Result<T, E>` (E: Display): write `-> Result<T, E>`"),
        ));
    };
    Ok(Signature { names, types, ok })
}

/// `T` of a `Result<T, ..>` return type.
fn result_ok(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}

fn common(o: &Options, fn_name: &syn::Ident) -> (String, TokenStream) {
    let name = o.name.clone().unwrap_or_else(|| fn_name.to_string());
    let rt = quote!(::flotilla::__private::runtime);
    let retries = o.retries.unwrap_or(0);
    let delay = o.delay.clone().unwrap_or(quote!(#rt::RetryDelay::None));
    let jitter = match o.jitter {
        Some(j) => quote!(Some(#j)),
        None => quote!(None),
    };
    let policy = quote!(#rt::RetryPolicy {
        retries: #retries,
        delay: #delay,
        jitter_factor: #jitter,
        condition: #rt::RetryCondition::Always,
    });
    (name, policy)
}

fn ms(v: Option<u64>) -> TokenStream {
    match v {
        Some(ms) => quote!(Some(::std::time::Duration::from_millis(#ms))),
        None => quote!(None),
    }
}

pub fn task(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let o = attrs::parse(Kind::Task, attr)?;
    let f: ItemFn = syn::parse2(item)?;
    let sig = check(Kind::Task, &f)?;
    let (task_name, policy) = common(&o, &f.sig.ident);
    let ident = &f.sig.ident;
    let vis = &f.vis;
    let marker = format_ident!("__flotilla_task_{}", ident);
    let inner = format_ident!("__flotilla_task_body_{}", ident);
    let call_fn = format_ident!("__flotilla_task_call_{}", ident);
    let after = format_ident!("__flotilla_task_after_{}", ident);
    let docs: Vec<_> = f.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let other_attrs: Vec<_> = f.attrs.iter().filter(|a| !a.path().is_ident("doc")).collect();
    let Signature { names, types, ok } = sig;
    let inputs = &f.sig.inputs;
    let output = &f.sig.output;
    let block = &f.block;
    let timeout = ms(o.timeout);
    let cache_expiration = ms(o.cache_expiration);
    let cache = o.cache;
    let refresh = o.refresh_cache;
    let tags = &o.tags;
    let idx: Vec<syn::Index> = (0..names.len()).map(syn::Index::from).collect();
    let cache_key = match &o.cache_key {
        Some(path) => quote!(Some(#path(#(&args.#idx),*))),
        None => quote!(None),
    };
    let (item_ty, destructure) = if types.len() == 1 {
        let t = &types[0];
        let n = &names[0];
        (quote!(#t), quote!(let #n = item;))
    } else {
        (quote!((#(#types,)*)), quote!(let (#(#names,)*) = item;))
    };
    let arg_span = types.first().map(|t| t.span()).unwrap_or_else(Span::call_site);
    let arg_checks = types
        .iter()
        .map(|t| quote::quote_spanned!(t.span()=> __flotilla_is_arg::<#t>();));
    let ok_check = quote::quote_spanned!(ok.span()=> __flotilla_is_output::<#ok>(););
    let _ = arg_span;
    Ok(quote! {
        #[allow(non_camel_case_types)]
        #[doc(hidden)]
        #[derive(Clone, Copy, Debug)]
        #vis struct #marker;

        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #ident: #marker = #marker;

        #[doc(hidden)]
        #[allow(non_snake_case, clippy::needless_lifetimes)]
        #(#other_attrs)*
        #vis async fn #inner(#inputs) #output #block

        const _: () = {
            fn __flotilla_is_arg<T: ::flotilla::__private::TaskArg>() {}
            fn __flotilla_is_output<T: ::flotilla::__private::TaskArg>() {}
            #[allow(dead_code)]
            fn __flotilla_check() {
                #(#arg_checks)*
                #ok_check
            }
        };

        impl ::flotilla::__private::TaskDef for #marker {
            type Args = (#(#types,)*);
            type Output = #ok;
            const NAME: &'static str = #task_name;
            fn options() -> ::flotilla::__private::TaskOptions {
                ::flotilla::__private::TaskOptions {
                    retry: #policy,
                    timeout: #timeout,
                    cache: #cache,
                    cache_expiration: #cache_expiration,
                    refresh_cache: #refresh,
                    tags: vec![#(::std::string::String::from(#tags)),*],
                }
            }
            #[allow(unused_variables)]
            fn cache_key(args: &Self::Args) -> ::std::option::Option<::std::string::String> {
                #cache_key
            }
            fn run(args: Self::Args) -> ::flotilla::__private::BoxFuture<::std::result::Result<#ok, ::std::string::String>> {
                let (#(#names,)*) = args;
                ::std::boxed::Box::pin(async move {
                    #inner(#(#names),*).await.map_err(|e| ::std::string::ToString::to_string(&e))
                })
            }
        }

        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #call_fn(#(#names: #types),*) -> ::flotilla::TaskFuture<#ok> {
            ::flotilla::__private::call_task::<#marker>((#(#names,)*))
        }

        impl ::std::ops::Deref for #marker {
            type Target = fn(#(#types),*) -> ::flotilla::TaskFuture<#ok>;
            fn deref(&self) -> &Self::Target {
                const F: fn(#(#types),*) -> ::flotilla::TaskFuture<#ok> = #call_fn;
                &F
            }
        }

        #[allow(dead_code)]
        impl #marker {
            /// Starts a task run now and returns its handle (await it for the result).
            #vis fn submit(&self, #(#names: #types),*) -> ::flotilla::TaskHandle<#ok> {
                ::flotilla::__private::submit_task::<#marker>((#(#names,)*), ::std::vec::Vec::new())
            }

            /// Starts one task run per item (in order) and returns their handles.
            #vis fn map<I: ::std::iter::IntoIterator<Item = #item_ty>>(&self, items: I) -> ::std::vec::Vec<::flotilla::TaskHandle<#ok>> {
                items.into_iter().map(|item| { #destructure self.submit(#(#names),*) }).collect()
            }

            /// The same task, started only once `deps` have completed (without their data).
            #vis fn wait_for<D: ::std::iter::IntoIterator<Item = ::flotilla::Completion>>(&self, deps: D) -> #after {
                #after(deps.into_iter().collect())
            }
        }

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Debug)]
        #vis struct #after(::std::vec::Vec<::flotilla::Completion>);

        impl #after {
            /// Starts the task run once the dependencies completed.
            #[allow(dead_code)]
            #vis fn submit(self, #(#names: #types),*) -> ::flotilla::TaskHandle<#ok> {
                ::flotilla::__private::submit_task::<#marker>((#(#names,)*), self.0)
            }
        }
    })
}

pub fn flow(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let o = attrs::parse(Kind::Flow, attr)?;
    let f: ItemFn = syn::parse2(item)?;
    let sig = check(Kind::Flow, &f)?;
    let (flow_name, policy) = common(&o, &f.sig.ident);
    let ident = &f.sig.ident;
    let vis = &f.vis;
    let marker = format_ident!("__flotilla_flow_{}", ident);
    let params = format_ident!("__flotilla_flow_params_{}", ident);
    let inner = format_ident!("__flotilla_flow_body_{}", ident);
    let call_fn = format_ident!("__flotilla_flow_call_{}", ident);
    let docs: Vec<_> = f.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let other_attrs: Vec<_> = f.attrs.iter().filter(|a| !a.path().is_ident("doc")).collect();
    let Signature { names, types, ok } = sig;
    let inputs = &f.sig.inputs;
    let output = &f.sig.output;
    let block = &f.block;
    let timeout = ms(o.timeout);
    let version = match &o.version {
        Some(v) => quote!(Some(::std::string::String::from(#v))),
        None => quote!(None),
    };
    let resume = o.resume.unwrap_or(true);
    let result_storage = match &o.result_storage {
        Some(s) => quote!(Some(::std::string::String::from(#s))),
        None => quote!(None),
    };
    let arg_checks = types
        .iter()
        .map(|t| quote::quote_spanned!(t.span()=> __flotilla_is_arg::<#t>();));
    let ok_check = quote::quote_spanned!(ok.span()=> __flotilla_is_arg::<#ok>(););
    Ok(quote! {
        #[allow(non_camel_case_types)]
        #[doc(hidden)]
        #[derive(Clone, Copy, Debug)]
        #vis struct #marker;

        #(#docs)*
        #[allow(non_upper_case_globals)]
        #vis const #ident: #marker = #marker;

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(::flotilla::__private::serde::Serialize, ::flotilla::__private::serde::Deserialize)]
        #[serde(crate = "::flotilla::__private::serde", deny_unknown_fields)]
        #vis struct #params {
            #(pub #names: #types,)*
        }

        #[doc(hidden)]
        #[allow(non_snake_case)]
        #(#other_attrs)*
        #vis async fn #inner(#inputs) #output #block

        const _: () = {
            fn __flotilla_is_arg<T: ::flotilla::__private::TaskArg>() {}
            #[allow(dead_code)]
            fn __flotilla_check() {
                #(#arg_checks)*
                #ok_check
            }
        };

        impl ::flotilla::__private::FlowDef for #marker {
            type Params = #params;
            type Output = #ok;
            const NAME: &'static str = #flow_name;
            fn options() -> ::flotilla::__private::FlowOptions {
                ::flotilla::__private::FlowOptions {
                    retry: #policy,
                    timeout: #timeout,
                    version: #version,
                    resume: #resume,
                    resume_param: false,
                    result_storage: #result_storage,
                }
            }
            fn run(params: Self::Params) -> ::flotilla::__private::BoxFuture<::std::result::Result<#ok, ::std::string::String>> {
                let #params { #(#names,)* } = params;
                ::std::boxed::Box::pin(async move {
                    #inner(#(#names),*).await.map_err(|e| ::std::string::ToString::to_string(&e))
                })
            }
        }

        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #call_fn(#(#names: #types),*) -> ::flotilla::FlowFuture<#ok> {
            ::flotilla::__private::call_flow::<#marker>(#params { #(#names,)* })
        }

        impl ::std::ops::Deref for #marker {
            type Target = fn(#(#types),*) -> ::flotilla::FlowFuture<#ok>;
            fn deref(&self) -> &Self::Target {
                const F: fn(#(#types),*) -> ::flotilla::FlowFuture<#ok> = #call_fn;
                &F
            }
        }
    })
}
