//! Framing of the command log: each write is one frame `[len: u32 LE][crc32: u32 LE][payload]`.
//!
//! A frame holds one batch of commands and is written with one write and made durable with one
//! `fdatasync` before the next frame is written, so after a crash at most the last frame of the
//! log can be incomplete. Reading tells a torn last frame (dropped cleanly: it was never
//! acknowledged) from corruption before the end (an error).

/// The header: length and checksum.
pub const FRAME_HEADER_BYTES: usize = 8;
/// The largest payload of one frame.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Appends a frame holding `payload` to `out`.
///
/// # Panics
/// Never for payloads up to [`FRAME_BYTES_MAX`]; callers bound their batches below it.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// How a sequence of frames ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEnd {
    /// Every byte belongs to a valid frame.
    Clean,
    /// The last frame, from this offset, is incomplete or fails its checksum, and nothing valid
    /// follows: a write cut short by a crash. Truncate here.
    Torn {
        /// Where the torn frame starts.
        offset: usize,
    },
    /// A frame at this offset is invalid and a valid frame follows it: the log is damaged.
    Corrupt {
        /// Where the invalid frame starts.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Splits `bytes` into frame payloads and says how they end.
pub fn decode_frames(bytes: &[u8]) -> (Vec<&[u8]>, FrameEnd) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match frame_at(bytes, at) {
            Ok(payload) => {
                out.push(payload);
                at += FRAME_HEADER_BYTES + payload.len();
            }
            Err(reason) => {
                let end = if valid_frame_follows(bytes, at) {
                    FrameEnd::Corrupt { offset: at, reason }
                } else {
                    FrameEnd::Torn { offset: at }
                };
                return (out, end);
            }
        }
    }
    (out, FrameEnd::Clean)
}

fn frame_at(bytes: &[u8], at: usize) -> Result<&[u8], String> {
    let rest = &bytes[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(format!("{} bytes left, short of a frame header", rest.len()));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 || len > FRAME_BYTES_MAX {
        return Err(format!("frame length {len} out of range"));
    }
    let Some(payload) = rest.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
        return Err(format!("frame of {len} bytes cut short"));
    };
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".to_owned());
    }
    Ok(payload)
}

/// Whether a valid frame starts right after the (claimed) end of the invalid one at `at`.
fn valid_frame_follows(bytes: &[u8], at: usize) -> bool {
    let rest = &bytes[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return false;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let next = at.saturating_add(FRAME_HEADER_BYTES).saturating_add(len);
    len > 0 && len <= FRAME_BYTES_MAX && next < bytes.len() && frame_at(bytes, next).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_frame(p, &mut out);
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        let bytes = log(&[b"one", b"two two", &[0u8; 1000]]);
        let (frames, end) = decode_frames(&bytes);
        assert_eq!(end, FrameEnd::Clean);
        assert_eq!(frames, vec![&b"one"[..], b"two two", &[0u8; 1000]]);
    }

    #[test]
    fn a_cut_last_frame_is_torn() {
        let bytes = log(&[b"one", b"two two"]);
        for cut in 1..(FRAME_HEADER_BYTES + 7) {
            let (frames, end) = decode_frames(&bytes[..bytes.len() - cut]);
            assert_eq!(frames, vec![&b"one"[..]]);
            assert_eq!(end, FrameEnd::Torn { offset: 11 });
        }
    }

    #[test]
    fn a_damaged_last_frame_is_torn_but_a_damaged_middle_frame_is_corrupt() {
        let mut bytes = log(&[b"one", b"two two"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(decode_frames(&bytes).1, FrameEnd::Torn { offset: 11 });
        let mut bytes = log(&[b"one", b"two two"]);
        bytes[9] ^= 1;
        assert!(matches!(
            decode_frames(&bytes).1,
            FrameEnd::Corrupt { offset: 0, .. }
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (frames, _) = decode_frames(&bytes);
            let total: usize = frames.iter().map(|f| f.len() + FRAME_HEADER_BYTES).sum();
            prop_assert!(total <= bytes.len());
        }

        #[test]
        fn any_cut_of_a_log_keeps_a_prefix(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..8), cut in 0usize..600) {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let bytes = log(&refs);
            let cut = cut.min(bytes.len());
            let (frames, end) = decode_frames(&bytes[..cut]);
            let corrupt = matches!(end, FrameEnd::Corrupt { .. });
            prop_assert!(!corrupt);
            prop_assert_eq!(&frames[..], &refs[..frames.len()]);
        }
    }
}
