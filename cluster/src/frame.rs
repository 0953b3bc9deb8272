//! Framing of the client protocol on QUIC streams: `[len: u32 BE][payload]`, the payload the
//! versioned rmp-serde encoding of `flotilla_runtime::codec`, the length capped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame accepted: bulk data (a shipped result) may use it all; every other
/// message is held to the node's message limit ([`MESSAGE_BYTES_DEFAULT`] by default).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The default message limit: a request or reply over it is refused with `payload_too_large`.
pub const MESSAGE_BYTES_DEFAULT: usize = 1024 * 1024;

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
    write_limited(w, value, FRAME_BYTES_MAX).await
}

/// Writes one value as a frame of at most `max` bytes. A client sends requests with no limit
/// of its own (up to 4 GiB) so that the node, which knows its limit, refuses an oversized one
/// with `payload_too_large` naming both sizes.
pub async fn write_limited<T: serde::Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    value: &T,
    max: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(value)?;
    write_frame(w, &frame, max).await
}

/// A value encoded as a whole frame (length prefix and payload, in one buffer).
pub fn encode_frame<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::with_capacity(132);
    frame.extend_from_slice(&[0; 4]);
    flotilla_runtime::codec::encode_into(value, &mut frame)?;
    let len = frame.len() - 4;
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    frame[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(frame)
}

/// Writes a frame made by [`encode_frame`] whose payload is at most `max` bytes, in one write.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let len = frame.len().saturating_sub(4);
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    w.write_all(frame).await?;
    Ok(())
}

/// Reads one frame's value.
pub async fn read<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<T, FrameError> {
    let len = read_len(r).await?;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    read_payload(r, len).await
}

/// Reads a frame's length prefix (the caller decides whether to read a payload that long).
pub async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => Ok(u32::from_be_bytes(len) as usize),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::End),
        Err(e) => Err(e.into()),
    }
}

/// Reads a payload of `len` bytes (already checked against a limit) and decodes it.
pub async fn read_payload<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<T, FrameError> {
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
