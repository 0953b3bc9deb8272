//! The encoding of everything Flotilla stores or sends: one format-version byte, then the value
//! as MessagePack with named fields (`rmp_serde::to_vec_named`), so fields can be added.
//!
//! Decoding never panics on arbitrary bytes: it returns a [`DecodeError`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format version this build writes.
pub const FORMAT_VERSION: u8 = 1;
/// The oldest format version this build reads.
pub const FORMAT_VERSION_MIN: u8 = 1;

/// A value that could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// Bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty record")]
    Empty,
    /// Written by a newer build.
    #[error(
        "format version {found} is newer than this build reads (up to {FORMAT_VERSION}); upgrade flotilla"
    )]
    NewerVersion {
        /// The version found.
        found: u8,
    },
    /// Written in a format too old to read.
    #[error("format version {found} is older than this build reads (from {FORMAT_VERSION_MIN})")]
    OlderVersion {
        /// The version found.
        found: u8,
    },
    /// The body is not a valid encoding of the expected type.
    #[error("malformed record: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Encodes a value: version byte + named MessagePack.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Encodes a value at the end of `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.push(FORMAT_VERSION);
    let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
    value.serialize(&mut ser)?;
    Ok(())
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version > FORMAT_VERSION {
        return Err(DecodeError::NewerVersion { found: version });
    }
    if version < FORMAT_VERSION_MIN {
        return Err(DecodeError::OlderVersion { found: version });
    }
    Ok(rmp_serde::from_slice(body)?)
}

#[cfg(test)]
mod tests;
