//! Large results in object storage, through the `object_store` crate: `file:///PATH` (a
//! directory every node mounts) or `s3://BUCKET/PREFIX` (credentials from an `s3` block, or
//! from the `AWS_*` environment). A result is written there by the node that produced it and
//! read from any node, so resuming a run on another node never needs the first node's disk.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload};

use super::results::{BlockStores, ResultShipper, valid_key};

/// Where results go, as `node start --result-store` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultStoreUrl {
    /// `file:///PATH`.
    File(PathBuf),
    /// `s3://BUCKET/PREFIX[?block=s3/NAME][&endpoint=URL][&region=R]`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix of every key (may be empty).
        prefix: String,
        /// The `s3` block with the credentials (and endpoint, region, path style).
        block: Option<String>,
        /// The endpoint (for S3-compatible servers), over the block's.
        endpoint: Option<String>,
        /// The region, over the block's.
        region: Option<String>,
    },
}

impl FromStr for ResultStoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("--result-store {s:?}: {why} (file:///PATH or s3://BUCKET/PREFIX?block=s3/NAME)")
        };
        if s.len() > 4096 {
            return Err(bad("too long"));
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file URL names an absolute path"));
            }
            return Ok(ResultStoreUrl::File(PathBuf::from(path)));
        }
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not a file:// or s3:// URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let (mut block, mut endpoint, mut region) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("a query is KEY=VALUE pairs"))?;
            match k {
                "block" => {
                    let name = v
                        .strip_prefix("s3/")
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| bad("block= names an s3 block, s3/NAME"))?;
                    block = Some(name.to_owned());
                }
                "endpoint" => endpoint = Some(v.to_owned()),
                "region" => region = Some(v.to_owned()),
                other => return Err(bad(&format!("unknown query key {other:?}"))),
            }
        }
        Ok(ResultStoreUrl::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            block,
            endpoint,
            region,
        })
    }
}

/// Fetches an `s3` block's fields by name (from the control node, for this node's store).
pub type BlockSource = Arc<dyn Fn(&str) -> Result<serde_json::Value, String> + Send + Sync>;

/// Results shipped to and fetched from object storage. The store is built at its first use
/// (an S3 block is read from the control node then, which may not be reachable at start).
pub struct ObjectShipper {
    url: ResultStoreUrl,
    blocks: Option<BlockSource>,
    handle: tokio::runtime::Handle,
    store: OnceLock<(Arc<dyn ObjectStore>, String)>,
}

impl std::fmt::Debug for ObjectShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectShipper")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ObjectShipper {
    /// A shipper to `url`, its I/O run on `handle`'s runtime, an S3 block read with `blocks`.
    pub fn new(url: ResultStoreUrl, handle: tokio::runtime::Handle, blocks: Option<BlockSource>) -> Self {
        ObjectShipper {
            url,
            blocks,
            handle,
            store: OnceLock::new(),
        }
    }

    fn store(&self) -> Result<(Arc<dyn ObjectStore>, String), String> {
        if let Some(s) = self.store.get() {
            return Ok(s.clone());
        }
        let built = self.build()?;
        Ok(self.store.get_or_init(|| built).clone())
    }

    fn build(&self) -> Result<(Arc<dyn ObjectStore>, String), String> {
        match &self.url {
            ResultStoreUrl::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| e.to_string())?;
                Ok((Arc::new(fs), String::new()))
            }
            ResultStoreUrl::S3 {
                bucket,
                prefix,
                block,
                endpoint,
                region,
            } => {
                // reqwest's rustls needs a process-wide provider: ring, as everywhere here
                // (an error only says one is installed already).
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = AmazonS3Builder::from_env();
                let mut bucket = bucket.clone();
                let mut endpoint = endpoint.clone();
                let mut region = region.clone();
                let mut path_style = true;
                if let Some(name) = block {
                    let source = self
                        .blocks
                        .as_ref()
                        .ok_or("no control node to read the s3 block from")?;
                    let fields = source(name)?;
                    let s3: flotilla_runtime::block::S3Block =
                        serde_json::from_value(fields).map_err(|e| format!("block s3/{name}: {e}"))?;
                    b = b
                        .with_access_key_id(s3.access_key_id)
                        .with_secret_access_key(s3.secret_access_key);
                    endpoint = endpoint.or(s3.endpoint);
                    region = region.or(s3.region);
                    path_style = s3.path_style;
                    if bucket.is_empty() {
                        bucket = s3.bucket;
                    }
                }
                b = b.with_bucket_name(bucket);
                let http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
                b = b
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(http)
                            .with_timeout(std::time::Duration::from_secs(60)),
                    )
                    .with_region(region.unwrap_or_else(|| "us-east-1".to_owned()))
                    .with_virtual_hosted_style_request(!path_style);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                let s3 = b.build().map_err(|e| e.to_string())?;
                Ok((Arc::new(s3), prefix.clone()))
            }
        }
    }

    fn path(prefix: &str, key: &str) -> Result<ObjectPath, String> {
        if !valid_key(key) {
            return Err(format!("{key:?} is not a result key"));
        }
        Ok(if prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{prefix}/{key}"))
        })
    }
}

impl ResultShipper for ObjectShipper {
    fn ship(&self, key: &str, bytes: &[u8]) -> Result<(), String> {
        let (store, prefix) = self.store()?;
        let path = Self::path(&prefix, key)?;
        let payload = PutPayload::from(bytes.to_vec());
        self.handle
            .block_on(store.put(&path, payload))
            .map(|_| ())
            .map_err(|e| format!("cannot write {path} to the result store: {e}"))
    }

    fn fetch(&self, key: &str) -> Result<Vec<u8>, String> {
        let (store, prefix) = self.store()?;
        let path = Self::path(&prefix, key)?;
        self.handle
            .block_on(async { store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| format!("cannot read {path} from the result store: {e}"))
    }
}

/// Large results in object storage: the store reads an `s3` block from the control node, over
/// the cluster's mutual TLS, when it is first used.
pub(crate) fn for_node(url: ResultStoreUrl) -> Arc<dyn ResultShipper> {
    let handle = tokio::runtime::Handle::current();
    Arc::new(ObjectShipper::new(
        url,
        handle.clone(),
        Some(block_source(handle)),
    ))
}

/// The object stores of `s3` blocks, each built at its first use and kept (the block is read
/// from the control node then).
pub struct NamedStores {
    blocks: BlockSource,
    handle: tokio::runtime::Handle,
    built: std::sync::Mutex<std::collections::HashMap<String, Arc<ObjectShipper>>>,
}

impl std::fmt::Debug for NamedStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedStores").finish_non_exhaustive()
    }
}

impl NamedStores {
    /// Stores whose blocks `blocks` reads, their I/O run on `handle`'s runtime.
    pub fn new(blocks: BlockSource, handle: tokio::runtime::Handle) -> Self {
        NamedStores {
            blocks,
            handle,
            built: Default::default(),
        }
    }
}

impl BlockStores for NamedStores {
    fn store(&self, storage: &str) -> Result<Arc<dyn ResultShipper>, String> {
        flotilla_runtime::block::check_result_storage(storage)?;
        let name = storage.strip_prefix("s3/").unwrap_or(storage);
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let shipper = built.entry(name.to_owned()).or_insert_with(|| {
            let url = ResultStoreUrl::S3 {
                bucket: String::new(),
                prefix: String::new(),
                block: Some(name.to_owned()),
                endpoint: None,
                region: None,
            };
            Arc::new(ObjectShipper::new(
                url,
                self.handle.clone(),
                Some(self.blocks.clone()),
            ))
        });
        Ok(shipper.clone())
    }
}

/// The object stores of `s3` blocks for a node: each block read from the control node.
pub(crate) fn block_stores() -> Arc<dyn BlockStores> {
    let handle = tokio::runtime::Handle::current();
    Arc::new(NamedStores::new(block_source(handle.clone()), handle))
}

/// Reads an `s3` block's fields from the control node (over the cluster's sessions).
fn block_source(h: tokio::runtime::Handle) -> BlockSource {
    Arc::new(move |name: &str| {
        let request = flotilla_cluster::wire::Request::StoreBlock(name.to_owned());
        match h.block_on(crate::node::plane::request(request))? {
            flotilla_cluster::wire::Response::Resolved(mut b) => b
                .pop()
                .map(|(_, v)| v)
                .ok_or_else(|| format!("block s3/{name} was not given")),
            flotilla_cluster::wire::Response::Error(e) => Err(e.message),
            _ => Err("an unexpected answer to a request for a block".into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_store_urls_are_read_or_refused() {
        assert_eq!(
            "file:///mnt/results".parse::<ResultStoreUrl>(),
            Ok(ResultStoreUrl::File("/mnt/results".into()))
        );
        assert_eq!(
            "s3://bucket/runs/prod?block=s3/lake&region=eu-west-1".parse::<ResultStoreUrl>(),
            Ok(ResultStoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: "runs/prod".into(),
                block: Some("lake".into()),
                endpoint: None,
                region: Some("eu-west-1".into()),
            })
        );
        for bad in [
            "file://relative",
            "s3:///x",
            "ftp://x",
            "s3://b?block=secret/x",
            "s3://b?colour=red",
        ] {
            assert!(bad.parse::<ResultStoreUrl>().is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_store_keeps_what_one_node_ships_for_another() {
        let dir = tempfile::tempdir().expect("dir");
        let url = ResultStoreUrl::File(dir.path().join("shared"));
        let key = "task-runs/0190c0de-0000-7000-8000-000000000001-1.bin";
        let (u1, u2) = (url.clone(), url);
        let handle = tokio::runtime::Handle::current();
        let h2 = handle.clone();
        tokio::task::spawn_blocking(move || {
            ObjectShipper::new(u1, handle, None)
                .ship(key, b"large result")
                .expect("shipped");
        })
        .await
        .expect("joined");
        let back = tokio::task::spawn_blocking(move || ObjectShipper::new(u2, h2, None).fetch(key))
            .await
            .expect("joined")
            .expect("fetched");
        assert_eq!(back, b"large result");
        assert!(dir.path().join("shared").join(key).exists());
    }
}
