//! Framing of the client protocol on QUIC streams: `[len: u32 BE][payload]`, the payload the
//! versioned rmp-serde encoding of `flotilla_runtime::codec`, the length capped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame accepted.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream ended cleanly before a frame.
    #[error("the stream ended")]
    End,
    /// The peer announced a frame over the limit.
    #[error("a frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// Reading or writing failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The payload does not decode.
    #[error("undecodable frame: {0}")]
    Decode(#[from] flotilla_runtime::codec::DecodeError),
    /// The value could not be encoded.
    #[error("unencodable value: {0}")]
    Encode(#[from] flotilla_runtime::codec::EncodeError),
}

/// Writes one value as a frame.
pub async fn write<T: serde::Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    let payload = flotilla_runtime::codec::encode(value)?;
    if payload.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(payload.len() + 4);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&payload);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame's value.
pub async fn read<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::End),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(flotilla_runtime::codec::decode(&payload)?)
}

/// Decodes frames from a byte buffer (for tests and fuzzing): the values, and whether bytes
/// were left over.
pub fn decode_all<T: serde::de::DeserializeOwned>(mut bytes: &[u8]) -> Result<Vec<T>, FrameError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Some(head) = bytes.get(..4) else {
            return Err(FrameError::End);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge(len));
        }
        let Some(payload) = bytes.get(4..4 + len) else {
            return Err(FrameError::End);
        };
        out.push(flotilla_runtime::codec::decode(payload)?);
        bytes = &bytes[4 + len..];
    }
    Ok(out)
}
