//! Parsing of `#[task(...)]` and `#[flow(...)]` attributes, with errors that say what to do.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, Meta, Token};

/// Which macro is parsing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Task,
    Flow,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Flow => "flow",
        }
    }

    fn known(self) -> &'static [&'static str] {
        match self {
            Kind::Task => &[
                "name",
                "retries",
                "retry_delay",
                "retry_delays",
                "backoff",
                "jitter",
                "timeout",
                "cache",
                "cache_key",
                "cache_expiration",
                "refresh_cache",
                "tags",
            ],
            Kind::Flow => &[
                "name",
                "retries",
                "retry_delay",
                "retry_delays",
                "backoff",
                "jitter",
                "timeout",
                "version",
                "resume",
                "result_storage",
            ],
        }
    }
}

/// The parsed options, as tokens ready to splice.
#[derive(Default)]
pub struct Options {
    pub name: Option<String>,
    pub retries: Option<u32>,
    /// Tokens of a `RetryDelay` value.
    pub delay: Option<TokenStream>,
    pub jitter: Option<f64>,
    /// Milliseconds.
    pub timeout: Option<u64>,
    pub cache: bool,
    pub cache_key: Option<syn::Path>,
    /// Milliseconds.
    pub cache_expiration: Option<u64>,
    pub refresh_cache: bool,
    pub tags: Vec<String>,
    pub version: Option<String>,
    pub resume: Option<bool>,
    /// `s3/NAME`.
    pub result_storage: Option<String>,
}

fn err(span: Span, msg: impl std::fmt::Display) -> syn::Error {
    syn::Error::new(span, msg)
}

fn lit_str(e: &Expr, what: &str) -> syn::Result<String> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.value()),
        _ => Err(err(
            e.span(),
            format!("`{what}` takes a string, e.g. {what} = \"...\""),
        )),
    }
}

fn duration_ms(e: &Expr, what: &str) -> syn::Result<u64> {
    let s = match e {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => s.value(),
        _ => {
            return Err(err(
                e.span(),
                format!("`{what}` takes a duration string, e.g. {what} = \"30s\" (units: ms, s, m, h, d)"),
            ));
        }
    };
    let d = humantime::parse_duration(&s).map_err(|x| {
        err(
            e.span(),
            format!(
                "`{what} = \"{s}\"` is not a duration ({x}); write e.g. \"500ms\", \"30s\", \"1m\", \"1h\""
            ),
        )
    })?;
    u64::try_from(d.as_millis()).map_err(|_| err(e.span(), format!("`{what}` is too long")))
}

fn int(e: &Expr, what: &str) -> syn::Result<u32> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i
            .base10_parse()
            .map_err(|_| err(e.span(), format!("`{what}` takes a whole number"))),
        _ => Err(err(
            e.span(),
            format!("`{what}` takes a whole number, e.g. {what} = 3"),
        )),
    }
}

fn float(e: &Expr, what: &str) -> syn::Result<f64> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => f.base10_parse(),
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<u32>().map(f64::from),
        _ => Err(err(
            e.span(),
            format!("`{what}` takes a number, e.g. {what} = 0.5"),
        )),
    }
    .map_err(|_| err(e.span(), format!("`{what}` takes a number, e.g. {what} = 0.5")))
}

fn boolean(e: &Expr, what: &str) -> syn::Result<bool> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(b), ..
        }) => Ok(b.value),
        _ => Err(err(e.span(), format!("`{what}` takes `true` or `false`"))),
    }
}

fn strings(e: &Expr, what: &str) -> syn::Result<Vec<String>> {
    match e {
        Expr::Array(a) => a.elems.iter().map(|x| lit_str(x, what)).collect(),
        _ => Err(err(
            e.span(),
            format!("`{what}` takes a list of strings, e.g. {what} = [\"a\", \"b\"]"),
        )),
    }
}

fn backoff(e: &Expr) -> syn::Result<TokenStream> {
    let usage =
        "`backoff` takes `exponential(factor = 2, max = \"1m\")` (and `retry_delay` for the first delay)";
    let Expr::Call(call) = e else {
        return Err(err(e.span(), usage));
    };
    match &*call.func {
        Expr::Path(p) if p.path.is_ident("exponential") => {}
        _ => return Err(err(call.func.span(), usage)),
    }
    let mut factor = 2.0;
    let mut max_ms: u64 = 3_600_000;
    for arg in &call.args {
        let Expr::Assign(a) = arg else {
            return Err(err(arg.span(), usage));
        };
        let Expr::Path(k) = &*a.left else {
            return Err(err(a.left.span(), usage));
        };
        if k.path.is_ident("factor") {
            factor = float(&a.right, "factor")?;
            if factor < 1.0 {
                return Err(err(a.right.span(), "the backoff `factor` must be at least 1"));
            }
        } else if k.path.is_ident("max") {
            max_ms = duration_ms(&a.right, "max")?;
        } else {
            return Err(err(k.span(), format!("unknown backoff option; {usage}")));
        }
    }
    Ok(quote!((#factor, #max_ms)))
}

/// Parses the attribute's arguments.
pub fn parse(kind: Kind, attr: TokenStream) -> syn::Result<Options> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut o = Options::default();
    let mut base_delay_ms: Option<u64> = None;
    let mut delay_list: Option<Vec<u64>> = None;
    let mut exp: Option<TokenStream> = None;
    for meta in metas {
        let (key, value) = match &meta {
            Meta::NameValue(nv) => (nv.path.clone(), nv.value.clone()),
            Meta::Path(p) => {
                return Err(err(
                    p.span(),
                    format!("`{}` needs a value, e.g. `{} = ...`", quote!(#p), quote!(#p)),
                ));
            }
            Meta::List(l) => {
                return Err(err(
                    l.span(),
                    format!("write `{} = ...` inside #[{}(...)]", quote!(#l.path), kind.name()),
                ));
            }
        };
        let Some(ident) = key.get_ident().map(|i| i.to_string()) else {
            return Err(err(key.span(), "expected a plain option name"));
        };
        if !kind.known().contains(&ident.as_str()) {
            return Err(err(
                key.span(),
                format!(
                    "unknown #[{}] option `{ident}`; expected one of: {}",
                    kind.name(),
                    kind.known().join(", ")
                ),
            ));
        }
        match ident.as_str() {
            "name" => {
                let n = lit_str(&value, "name")?;
                if n.is_empty() {
                    return Err(err(value.span(), "`name` must not be empty"));
                }
                o.name = Some(n);
            }
            "retries" => o.retries = Some(int(&value, "retries")?),
            "retry_delay" => base_delay_ms = Some(duration_ms(&value, "retry_delay")?),
            "retry_delays" => {
                let Expr::Array(a) = &value else {
                    return Err(err(
                        value.span(),
                        "`retry_delays` takes a list, e.g. [\"1s\", \"10s\", \"1m\"]",
                    ));
                };
                if a.elems.is_empty() {
                    return Err(err(value.span(), "`retry_delays` needs at least one delay"));
                }
                delay_list = Some(
                    a.elems
                        .iter()
                        .map(|x| duration_ms(x, "retry_delays"))
                        .collect::<syn::Result<_>>()?,
                );
            }
            "backoff" => exp = Some(backoff(&value)?),
            "jitter" => {
                let j = float(&value, "jitter")?;
                if !(0.0..=100.0).contains(&j) {
                    return Err(err(value.span(), "`jitter` must be between 0 and 100"));
                }
                o.jitter = Some(j);
            }
            "timeout" => o.timeout = Some(duration_ms(&value, "timeout")?),
            "cache" => o.cache = boolean(&value, "cache")?,
            "cache_key" => match &value {
                Expr::Path(p) => {
                    o.cache_key = Some(p.path.clone());
                    o.cache = true;
                }
                _ => {
                    return Err(err(
                        value.span(),
                        "`cache_key` takes the path of a function, e.g. cache_key = my_key (it gets the task's arguments by reference and returns a String)",
                    ));
                }
            },
            "cache_expiration" => {
                o.cache_expiration = Some(duration_ms(&value, "cache_expiration")?);
                o.cache = true;
            }
            "refresh_cache" => o.refresh_cache = boolean(&value, "refresh_cache")?,
            "tags" => o.tags = strings(&value, "tags")?,
            "version" => o.version = Some(lit_str(&value, "version")?),
            "resume" => o.resume = Some(boolean(&value, "resume")?),
            "result_storage" => {
                let s = lit_str(&value, "result_storage")?;
                let name = s.strip_prefix("s3/").unwrap_or_default();
                if name.is_empty() || name.contains('/') {
                    return Err(err(
                        value.span(),
                        "`result_storage` names an s3 block: result_storage = \"s3/NAME\"",
                    ));
                }
                o.result_storage = Some(s);
            }
            _ => unreachable!("checked against the known options"),
        }
    }
    if delay_list.is_some() && (base_delay_ms.is_some() || exp.is_some()) {
        return Err(err(
            Span::call_site(),
            "give either `retry_delays` or `retry_delay` (with an optional `backoff`), not both",
        ));
    }
    let rt = quote!(::flotilla::__private::runtime);
    o.delay = match (delay_list, base_delay_ms, exp) {
        (Some(list), _, _) => {
            Some(quote!(#rt::RetryDelay::List(vec![#(::std::time::Duration::from_millis(#list)),*])))
        }
        (None, base, Some(e)) => {
            let base = base.unwrap_or(1000);
            Some(quote!({
                let (factor, max): (f64, u64) = #e;
                #rt::RetryDelay::Exponential {
                    base: ::std::time::Duration::from_millis(#base),
                    factor,
                    max: ::std::time::Duration::from_millis(max),
                }
            }))
        }
        (None, Some(base), None) => {
            Some(quote!(#rt::RetryDelay::Fixed(::std::time::Duration::from_millis(#base))))
        }
        (None, None, None) => None,
    };
    Ok(o)
}
