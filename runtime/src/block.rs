//! Blocks: typed documents of configuration and credentials that flows and automations name
//! (`secret/api-token`, `webhook/ops`). Each type is a Rust type; its secret fields are kept
//! sealed (encrypted) in the control state, and shown as `********`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// What a secret field shows instead of its value.
pub const MASK: &str = "********";
/// The largest block, encoded as JSON.
pub const BLOCK_BYTES_MAX: usize = 64 * 1024;

/// The types of block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockType {
    /// One secret value.
    Secret,
    /// A URL to post to, with headers and a signing secret.
    Webhook,
    /// An S3-compatible bucket.
    S3,
    /// Environment variables, every value secret.
    Env,
    /// Any JSON.
    Json,
}

/// A `secret` block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretBlock {
    /// The value (secret).
    pub value: String,
}

/// A `webhook` block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBlock {
    /// Where to post.
    pub url: String,
    /// Headers sent with each post.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The key of the body's HMAC-SHA256 signature (secret).
    #[serde(default)]
    pub secret: Option<String>,
}

/// An `s3` block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Block {
    /// The endpoint (for S3-compatible servers).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// The region.
    #[serde(default)]
    pub region: Option<String>,
    /// The access key's id.
    pub access_key_id: String,
    /// The secret access key (secret).
    pub secret_access_key: String,
    /// Path-style addressing.
    #[serde(default)]
    pub path_style: bool,
}

/// A block type a flow reads typed (`ctx.block::<S3Block>("lake")`).
pub trait TypedBlock: serde::de::DeserializeOwned {
    /// Its type.
    const TYPE: BlockType;
}

impl TypedBlock for SecretBlock {
    const TYPE: BlockType = BlockType::Secret;
}

impl TypedBlock for WebhookBlock {
    const TYPE: BlockType = BlockType::Webhook;
}

impl TypedBlock for S3Block {
    const TYPE: BlockType = BlockType::S3;
}

/// A field of a block type, for `block types`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSchema {
    /// Its name (`*` for any name).
    pub name: String,
    /// `string`, `bool`, `map` (of strings) or `json`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it must be given.
    pub required: bool,
    /// Whether it is sealed and masked.
    pub secret: bool,
}

fn field(name: &str, kind: &str, required: bool, secret: bool) -> FieldSchema {
    FieldSchema {
        name: name.to_owned(),
        kind: kind.to_owned(),
        required,
        secret,
    }
}

impl BlockType {
    /// Every type.
    pub const ALL: [BlockType; 5] = [
        BlockType::Secret,
        BlockType::Webhook,
        BlockType::S3,
        BlockType::Env,
        BlockType::Json,
    ];

    /// Its name (`secret`, `webhook`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            BlockType::Secret => "secret",
            BlockType::Webhook => "webhook",
            BlockType::S3 => "s3",
            BlockType::Env => "env",
            BlockType::Json => "json",
        }
    }

    /// The type named `s`.
    pub fn parse(s: &str) -> Result<BlockType, String> {
        BlockType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("no block type {s:?} (the types: secret, webhook, s3, env, json)"))
    }

    /// Its fields.
    pub fn schema(self) -> Vec<FieldSchema> {
        match self {
            BlockType::Secret => vec![field("value", "string", true, true)],
            BlockType::Webhook => vec![
                field("url", "string", true, false),
                field("headers", "map", false, false),
                field("secret", "string", false, true),
            ],
            BlockType::S3 => vec![
                field("endpoint", "string", false, false),
                field("bucket", "string", true, false),
                field("region", "string", false, false),
                field("access_key_id", "string", true, false),
                field("secret_access_key", "string", true, true),
                field("path_style", "bool", false, false),
            ],
            BlockType::Env => vec![field("*", "string", false, true)],
            BlockType::Json => vec![field("*", "json", false, false)],
        }
    }

    /// Whether field `name` is secret.
    pub fn is_secret(self, name: &str) -> bool {
        self.schema()
            .iter()
            .any(|f| f.secret && (f.name == name || f.name == "*"))
    }

    /// Checks a document of this type: an unknown field or a missing one is refused naming
    /// it. Answers the document as the type reads it (defaults filled in), as a JSON object.
    pub fn check(
        self,
        doc: &serde_json::Value,
    ) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let size = serde_json::to_vec(doc).map_or(usize::MAX, |b| b.len());
        if size > BLOCK_BYTES_MAX {
            return Err(format!(
                "a block is at most {BLOCK_BYTES_MAX} bytes of JSON, not {size}"
            ));
        }
        fn typed<T: serde::de::DeserializeOwned + Serialize>(
            doc: &serde_json::Value,
        ) -> Result<serde_json::Value, String> {
            // serde names unknown and missing fields, but shows a value of the wrong type: that
            // value may be a secret, so the message is replaced.
            let t: T = serde_json::from_value(doc.clone()).map_err(|e| {
                let e = e.to_string();
                if e.starts_with("invalid type") || e.starts_with("invalid value") {
                    "a field has the wrong type (strings, `headers` a map of strings, `path_style` true or false)".to_owned()
                } else {
                    e
                }
            })?;
            serde_json::to_value(t).map_err(|e| e.to_string())
        }
        let v = match self {
            BlockType::Secret => typed::<SecretBlock>(doc)?,
            BlockType::Webhook => {
                let v = typed::<WebhookBlock>(doc)?;
                let url = v.get("url").and_then(|u| u.as_str()).unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!("url: {url:?} is not an http:// or https:// URL"));
                }
                v
            }
            BlockType::S3 => typed::<S3Block>(doc)?,
            BlockType::Env => {
                let m = typed::<BTreeMap<String, String>>(doc)?;
                if let Some(k) = m.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
                        .cloned()
                }) {
                    return Err(format!("{k:?} is not an environment variable's name"));
                }
                m
            }
            BlockType::Json => doc.clone(),
        };
        match v {
            serde_json::Value::Object(m) => Ok(m),
            _ => Err("a block is a JSON object".into()),
        }
    }
}

impl std::fmt::Display for BlockType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value sealed with the cluster's secrets key (XChaCha20-Poly1305), its associated data the
/// block's key and the field's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Which key sealed it (so that keys can be rotated).
    pub key_id: String,
    /// The 24-byte nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// A block in the control state: its plain fields, and its secret ones sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// Its type.
    pub kind: BlockType,
    /// Its name (unique within its type).
    pub name: String,
    /// The fields that are not secret.
    pub plain: serde_json::Map<String, serde_json::Value>,
    /// The secret fields, sealed (each the JSON encoding of its value).
    pub sealed: BTreeMap<String, Sealed>,
    /// When it was created.
    pub created: Timestamp,
    /// When it was last changed.
    pub updated: Timestamp,
}

impl BlockRecord {
    /// `TYPE/NAME`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// What may be shown: plain fields, and `********` for each secret one.
    pub fn masked(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = self.plain.clone();
        for k in self.sealed.keys() {
            out.insert(k.clone(), serde_json::Value::String(MASK.to_owned()));
        }
        out
    }

    /// What a sealed field is bound to: the block and the field.
    pub fn associated_data(kind: BlockType, name: &str, field: &str) -> Vec<u8> {
        format!("flotilla.block/{kind}/{name}#{field}").into_bytes()
    }
}

/// The setting key of a block.
pub fn block_key(kind: BlockType, name: &str) -> String {
    format!("block/{kind}/{name}")
}

/// A flow's or deployment's `result_storage`: `s3/NAME`, an `s3` block.
pub fn check_result_storage(s: &str) -> Result<(), String> {
    match parse_reference(s) {
        Ok((BlockType::S3, name)) if name.len() <= 256 && !name.contains('/') => Ok(()),
        _ => Err(format!(
            "result_storage {s:?}: expected s3/NAME, the name of an s3 block"
        )),
    }
}

/// `TYPE/NAME` read as a block's type and name.
pub fn parse_reference(s: &str) -> Result<(BlockType, String), String> {
    let (t, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a block reference TYPE/NAME (such as secret/api-token)"))?;
    if n.is_empty() {
        return Err(format!("{s:?} names no block"));
    }
    Ok((BlockType::parse(t)?, n.to_owned()))
}

/// A placeholder `{{ flotilla.blocks.TYPE.NAME }}` or `{{ flotilla.blocks.TYPE.NAME.FIELD }}`
/// in a parameter: the block (`TYPE/NAME`) and the field (a `secret` block's `value` by
/// default).
fn placeholder(inner: &str) -> Option<(String, Option<String>)> {
    let path = inner.trim().strip_prefix("flotilla.blocks.")?;
    let mut parts = path.splitn(3, '.');
    let (kind, name, field) = (parts.next()?, parts.next()?, parts.next());
    let kind = BlockType::parse(kind).ok()?;
    (!name.is_empty()).then(|| (format!("{kind}/{name}"), field.map(str::to_owned)))
}

/// Every `{{ … }}` span of `s`: (start, end past `}}`, inside).
fn spans(s: &str) -> Vec<(usize, usize, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = s[from..].find("{{").map(|i| from + i) {
        let Some(close) = s[open + 2..].find("}}").map(|i| open + 2 + i) else {
            break;
        };
        out.push((open, close + 2, &s[open + 2..close]));
        from = close + 2;
    }
    out
}

/// The blocks a run's parameters name in placeholders (`TYPE/NAME` each, once).
pub fn referenced(params: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => {
                out.extend(
                    spans(s)
                        .into_iter()
                        .filter_map(|(_, _, i)| placeholder(i))
                        .map(|(b, _)| b),
                );
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(params, &mut out);
    out.sort();
    out.dedup();
    out
}

/// The parameters with each placeholder replaced by its block's field (`blocks`: `TYPE/NAME`
/// and its fields). A field that is missing is an error naming it.
pub fn substitute(
    params: &serde_json::Value,
    blocks: &BTreeMap<String, serde_json::Value>,
) -> Result<serde_json::Value, String> {
    Ok(match params {
        serde_json::Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            let mut last = 0;
            for (start, end, inner) in spans(s) {
                let Some((block, field)) = placeholder(inner) else {
                    continue;
                };
                let field = field.unwrap_or_else(|| "value".to_owned());
                let v = blocks
                    .get(&block)
                    .and_then(|b| b.get(&field))
                    .ok_or_else(|| format!("the parameters name {block}, which has no field {field}"))?;
                out.push_str(&s[last..start]);
                out.push_str(&v.as_str().map_or_else(|| v.to_string(), str::to_owned));
                last = end;
            }
            out.push_str(&s[last..]);
            serde_json::Value::String(out)
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(
            a.iter()
                .map(|x| substitute(x, blocks))
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Object(o) => serde_json::Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), substitute(x, blocks)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_in_parameters_are_found_and_replaced() {
        let params = serde_json::json!({
            "token": "{{ flotilla.blocks.secret.api-token }}",
            "url": "https://{{flotilla.blocks.s3.lake.bucket}}.example/{{ other }}",
            "n": 3,
            "list": ["{{ flotilla.blocks.secret.api-token }}"],
        });
        assert_eq!(referenced(&params), ["s3/lake", "secret/api-token"]);
        let blocks: BTreeMap<String, serde_json::Value> = [
            ("secret/api-token".to_owned(), serde_json::json!({"value": "t0k"})),
            ("s3/lake".to_owned(), serde_json::json!({"bucket": "b1"})),
        ]
        .into_iter()
        .collect();
        let out = substitute(&params, &blocks).expect("substituted");
        assert_eq!(
            out,
            serde_json::json!({"token": "t0k", "url": "https://b1.example/{{ other }}", "n": 3, "list": ["t0k"]})
        );
        let e = substitute(
            &serde_json::json!("{{ flotilla.blocks.s3.lake.region }}"),
            &blocks,
        )
        .unwrap_err();
        assert!(e.contains("s3/lake") && e.contains("region"), "{e}");
        assert!(referenced(&serde_json::json!("{{ flotilla.blocks.nope.x }} {{")).is_empty());
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let e = BlockType::Secret
            .check(&serde_json::json!({"value": "x", "colour": "red"}))
            .unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = BlockType::S3
            .check(&serde_json::json!({"bucket": "b"}))
            .unwrap_err();
        assert!(e.contains("access_key_id"), "{e}");
        let e = BlockType::Webhook
            .check(&serde_json::json!({"url": "ftp://x"}))
            .unwrap_err();
        assert!(e.contains("url"), "{e}");
        let ok = BlockType::Webhook
            .check(&serde_json::json!({"url": "http://127.0.0.1/h", "secret": "k"}))
            .expect("a webhook");
        assert_eq!(ok["headers"], serde_json::json!({}));
        assert!(BlockType::Env.is_secret("ANYTHING"));
        assert!(BlockType::Webhook.is_secret("secret"));
        assert!(!BlockType::Webhook.is_secret("url"));
        assert!(BlockType::Env.check(&serde_json::json!({"A=B": "x"})).is_err());
    }

    #[test]
    fn references_read_as_type_and_name() {
        assert_eq!(
            parse_reference("secret/api-token").expect("ok"),
            (BlockType::Secret, "api-token".to_owned())
        );
        assert!(parse_reference("nope/x").unwrap_err().contains("nope"));
        assert!(parse_reference("secret/").is_err());
        assert!(parse_reference("secret").is_err());
    }
}
