//! The cluster's secrets key: what seals the secret fields of blocks (XChaCha20-Poly1305).
//! `cluster init` writes it beside the certificates (mode 0600); every node that holds the
//! control state needs it. Each sealed value names the key that sealed it, so that a key can
//! be rotated later.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use flotilla_runtime::block::Sealed;
use sha2::Digest;

/// The key's file in the certificates directory.
pub const KEY_FILE: &str = "secrets.key";
const HEADER: &str = "flotilla-secrets-key-v1";

/// Why the key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file is missing or unreadable.
    #[error(
        "the cluster's secrets key {path}: {reason} (`cluster init` writes it beside the certificates, `cluster secrets-key --dir DIR` into a directory made before; copy it to every node that holds the control state)"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A value cannot be unsealed (another key, or altered).
    #[error("a sealed value cannot be opened: {0}")]
    Open(String),
}

/// The key.
#[derive(Clone)]
pub struct SecretsKey {
    id: String,
    cipher: XChaCha20Poly1305,
    raw: [u8; 32],
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SecretsKey {
    /// A new random key.
    pub fn generate() -> Self {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&key);
        Self::from_raw(raw)
    }

    fn from_raw(raw: [u8; 32]) -> Self {
        let id = hex::encode(&sha2::Sha256::digest(raw)[..8]);
        SecretsKey {
            id,
            cipher: XChaCha20Poly1305::new(&raw.into()),
            raw,
        }
    }

    /// Its id (the first 8 bytes of its SHA-256, in hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file's contents.
    pub fn encode(&self) -> String {
        format!("{HEADER} {}\n", hex::encode(self.raw))
    }

    /// Reads the key in `dir`.
    pub fn load(dir: &Path) -> Result<Self, SecretsError> {
        let path = dir.join(KEY_FILE);
        let bad = |reason: String| SecretsError::Unreadable {
            path: path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > 1024 {
            return Err(bad("not a secrets key (too large)".into()));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let hex_key = text
            .trim()
            .strip_prefix(HEADER)
            .map(str::trim)
            .ok_or_else(|| bad("not a secrets key".into()))?;
        let bytes = hex::decode(hex_key).map_err(|e| bad(format!("not a secrets key: {e}")))?;
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("not a secrets key (not 32 bytes)".into()))?;
        Ok(Self::from_raw(raw))
    }

    /// Writes a new key into `dir` unless one is there (for a certificates directory made
    /// before keys were); answers the key there.
    pub fn load_or_create(dir: &Path) -> Result<Self, SecretsError> {
        let path = dir.join(KEY_FILE);
        if !path.exists() {
            let key = SecretsKey::generate();
            match crate::certs::write_new(&path, key.encode().as_bytes(), 0o600) {
                Ok(()) => return Ok(key),
                Err(crate::certs::CertError::NameTaken(_)) => {}
                Err(e) => {
                    return Err(SecretsError::Unreadable {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Self::load(dir)
    }

    /// Seals `plaintext`, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad })
            // Encryption fails only past the cipher's length limit (256 GiB): not reached by a
            // block, which is at most 64 KiB.
            .unwrap_or_default();
        Sealed {
            key_id: self.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Opens a sealed value bound to `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if sealed.key_id != self.id {
            return Err(SecretsError::Open(format!(
                "sealed by key {}, and this node has key {}",
                sealed.key_id, self.id
            )));
        }
        if sealed.nonce.len() != 24 {
            return Err(SecretsError::Open("a nonce is 24 bytes".into()));
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| SecretsError::Open("altered, or bound to another block".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_with_their_key_and_binding_only() {
        let dir = tempfile::tempdir().expect("dir");
        let key = SecretsKey::load_or_create(dir.path()).expect("key");
        let again = SecretsKey::load(dir.path()).expect("the same key");
        assert_eq!(key.id(), again.id());
        let s = key.seal(b"s3cr3t", b"block/secret/a#value");
        assert!(!s.ciphertext.windows(6).any(|w| w == b"s3cr3t"));
        assert_eq!(again.open(&s, b"block/secret/a#value").expect("opens"), b"s3cr3t");
        assert!(again.open(&s, b"block/secret/b#value").is_err());
        let mut altered = s.clone();
        altered.ciphertext[0] ^= 1;
        assert!(key.open(&altered, b"block/secret/a#value").is_err());
        let other = SecretsKey::generate();
        assert!(
            other
                .open(&s, b"block/secret/a#value")
                .unwrap_err()
                .to_string()
                .contains(key.id())
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_missing_key_names_its_file() {
        let dir = tempfile::tempdir().expect("dir");
        let e = SecretsKey::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(KEY_FILE), "{e}");
    }
}
