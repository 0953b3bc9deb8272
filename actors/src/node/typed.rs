//! Typed payloads of the messages between nodes' actors. A [`Wire<T>`] carries its value as it
//! is: ractor hands a message to a local actor without encoding it, and only a message that
//! crosses to another node is encoded (the store's codec, rmp-serde behind a version byte) and
//! decoded there — into the value, or into an error naming what was wrong, never a panic on
//! bad bytes.

use flotilla_runtime::codec;
use ractor::BytesConvertable;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A message's payload: a value, or why the bytes it came as could not be decoded.
#[derive(Debug)]
pub struct Wire<T>(Result<T, String>);

impl<T> Wire<T> {
    /// A payload of `value`.
    pub fn new(value: T) -> Self {
        Wire(Ok(value))
    }

    /// The value, or why it could not be decoded.
    pub fn get(self) -> Result<T, String> {
        self.0
    }
}

impl<T: Serialize + DeserializeOwned> BytesConvertable for Wire<T> {
    fn into_bytes(self) -> Vec<u8> {
        match self.0 {
            Ok(v) => codec::encode(&v).unwrap_or_else(|e| {
                tracing::error!(error = %e, "a message's payload could not be encoded");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        Wire(codec::decode(&bytes).map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_crosses_as_bytes_and_bad_bytes_are_an_error() {
        let sent = Wire::new(vec![1u32, 2, 3]);
        let got = Wire::<Vec<u32>>::from_bytes(sent.into_bytes());
        assert_eq!(got.get(), Ok(vec![1, 2, 3]));
        for bad in [Vec::new(), vec![0xff; 3], b"not a payload".to_vec()] {
            assert!(Wire::<Vec<u32>>::from_bytes(bad).get().is_err());
        }
    }
}
