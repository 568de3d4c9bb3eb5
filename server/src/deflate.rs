//! permessage-deflate (RFC 7692): negotiation, the inbound transcoder and
//! outbound compression.
//!
//! **What is negotiated.** wshd always answers with
//! `server_no_context_takeover; client_no_context_takeover` (RFC 7692
//! §7.1.1.1 and §7.1.1.2 let a server add both even when the offer did not
//! ask): every message is compressed and decompressed on its own, so a
//! connection holds no zlib state between messages and an idle compressed
//! connection costs what an uncompressed one does. `server_max_window_bits=N`
//! in an offer is honoured (9..=15) and echoed; an offer asking for 8 is
//! declined, because zlib cannot compress with a 256-byte window (it
//! silently uses 512), and the next offer is tried. `client_max_window_bits`
//! needs no answer: a 15-bit inflater reads any smaller window.
//!
//! **Memory.** Compressors are per worker thread, one per window size used,
//! and reset before each message (no context takeover makes that legal):
//! about 256 KiB each for zlib's window and hash tables, never per
//! connection. An inflater (about 40 KiB) is taken from a per-thread spare
//! when a compressed message starts and given back when it ends; a
//! connection keeps one only while a compressed message is unfinished.
//!
//! **Inbound.** The codec (ws.rs) collects a compressed message's frames
//! (RSV1 on the first) and calls [`inflate`] once the last one is in, with
//! `max_message_size` as the limit on the *inflated* size: a zip bomb is
//! refused with 1009 after producing at most that many bytes. The budget
//! (budget.rs) counts the compressed bytes held while frames arrive.
//!
//! **Outbound.** [`compress`] turns one message into the payload of one
//! RSV1 frame. The last result is kept per thread: a topic message queued to
//! many subscribers shares one payload buffer, so it is compressed once per
//! worker thread, not once per subscriber.
//!
//! **Backend.** flate2 on zlib-rs (pure Rust). miniz_oxide cannot compress
//! with a window under 32 KiB, which `server_max_window_bits` needs.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Messages shorter than this are sent uncompressed: the deflate block
/// overhead eats the gain, and compressing costs CPU for nothing.
pub const MIN_COMPRESS: usize = 64;

/// The compression level: zlib's default, the one browsers and Node `ws`
/// use. Measured on a 4 KiB JSON echo (bench, one run): level 1 sent 1.43×
/// Node's bytes for 0.19× its CPU, level 6 sends the same bytes for 0.26×
/// its CPU. Wire size is what a route turns compression on for.
const LEVEL: u32 = 6;
/// The tail RFC 7692 §7.2.2 strips from each compressed message.
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// What a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Window for our compressor, 9..=15.
    pub server_max_window_bits: u8,
    /// The client asked for a window size: the answer must echo it.
    pub echo_window_bits: bool,
}

impl Params {
    /// The `Sec-WebSocket-Extensions` response value.
    pub fn response(&self) -> String {
        let mut s = String::from(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if self.echo_window_bits {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        s
    }
}

/// Picks the first acceptable permessage-deflate offer among the
/// `Sec-WebSocket-Extensions` header values, or `None` to run without it.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Params> {
    for value in values {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for offer in value.split(',') {
            if let Some(p) = accept_offer(offer) {
                return Some(p);
            }
        }
    }
    None
}

/// One offer: `permessage-deflate` and its parameters, or `None` when it is
/// another extension, malformed, or asks for what we cannot do.
fn accept_offer(offer: &str) -> Option<Params> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut params = Params {
        server_max_window_bits: 15,
        echo_window_bits: false,
    };
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (n.trim(), Some(v))
            }
            None => (p, None),
        };
        let slot = match name {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None, // RFC 7692 §7.1: unknown parameter, decline
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None; // §7.1: a parameter given twice, decline
        }
        match slot {
            0 | 1 if value.is_some() => return None,
            2 => {
                let bits = window_bits(value?)?;
                if bits < 9 {
                    return None; // see the module doc
                }
                params.server_max_window_bits = bits;
                params.echo_window_bits = true;
            }
            3 => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
            }
            _ => {}
        }
    }
    Some(params)
}

/// `8`..=`15`, digits only, no leading zero (RFC 7692 §7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (8..=15).contains(&n).then_some(n)
}

thread_local! {
    /// Compressors by window bits (index `bits - 9`), reset per message.
    static COMPRESSORS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([const { None }; 7]) };
    /// The last message compressed on this thread: (input, bits, output).
    static LAST: RefCell<Option<(Bytes, u8, Bytes)>> = const { RefCell::new(None) };
    /// A spare inflater.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// The payload of an RSV1 frame carrying `input`, or `None` when
/// compressing would not make it smaller (it then goes out uncompressed).
pub fn compress(input: &Bytes, bits: u8) -> Option<Bytes> {
    if input.len() < MIN_COMPRESS {
        return None;
    }
    // The same payload buffer as last time (a topic message going to its
    // next subscriber): `LAST` holds a reference to it, so the address
    // cannot have been reused for other bytes.
    let hit = LAST.with(|l| {
        l.borrow().as_ref().and_then(|(i, b, o)| {
            (i.as_ptr() == input.as_ptr() && i.len() == input.len() && *b == bits)
                .then(|| o.clone())
        })
    });
    if let Some(out) = hit {
        return (!out.is_empty()).then_some(out);
    }
    let out = COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        let z = c[usize::from(bits - 9)].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(LEVEL), false, bits)
        });
        deflate(z, input)
    });
    // An empty result records "not worth it" for the next subscriber.
    let out = out
        .filter(|o| o.len() < input.len())
        .map(Bytes::from)
        .unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = Some((input.clone(), bits, out.clone())));
    (!out.is_empty()).then_some(out)
}

/// One message through a reset compressor, tail stripped.
fn deflate(z: &mut Compress, input: &[u8]) -> Option<Vec<u8>> {
    z.reset();
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    loop {
        let done = z.total_in() as usize;
        z.compress_vec(&input[done..], &mut out, FlushCompress::Sync)
            .ok()?;
        // A sync flush is complete once all input is in and it did not
        // fill the output.
        if z.total_in() as usize == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
        Some(out)
    } else {
        None
    }
}

fn take_inflater() -> Decompress {
    INFLATER
        .with(|i| i.borrow_mut().take())
        .unwrap_or_else(|| Decompress::new_with_window_bits(false, 15))
}

fn give_back(mut z: Decompress) {
    z.reset(false);
    INFLATER.with(|i| {
        let mut i = i.borrow_mut();
        if i.is_none() {
            *i = Some(z);
        }
    });
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (`max_message_size`): close 1009.
    TooBig,
    /// It is not a valid deflate stream: close 1002 (RFC 7692 names no code;
    /// a broken extension payload is a protocol error).
    Corrupt,
}

/// Inflates one compressed message (its frames' payloads joined, the
/// RFC 7692 tail still stripped) to at most `limit` bytes. No context
/// takeover: each message starts from a fresh window, so the inflater is
/// the thread's spare, reset after use.
///
/// Output is produced in steps and checked against `limit` after each, so a
/// zip bomb costs at most `limit` bytes of memory and the CPU to produce
/// them before it is refused.
pub fn inflate(input: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    let mut z = take_inflater();
    let r = inflate_with(&mut z, input, limit);
    give_back(z);
    r
}

fn inflate_with(z: &mut Decompress, input: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    // Compressed JSON typically inflates 4-6x; start there, within the limit.
    let first = input.len().saturating_mul(4).clamp(64, limit.max(64));
    let mut out: Vec<u8> = Vec::with_capacity(first);
    for part in [input, &TAIL[..]] {
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                // Doubling, but never more than one byte past the limit:
                // that is enough to know a message is over it.
                let more = out.capacity().min(limit + 1 - out.len()).max(1);
                out.reserve_exact(more);
            }
            let (in0, out0) = (z.total_in(), z.total_out());
            let status = z
                .decompress_vec(&part[pos..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            pos += (z.total_in() - in0) as usize;
            if status == Status::StreamEnd {
                // A final block: whatever follows is not part of the message.
                return finish(out, limit);
            }
            let room = out.len() < out.capacity();
            let stuck = z.total_in() == in0 && z.total_out() == out0;
            // A sync flush is complete once the input is used up and the
            // output did not fill.
            if room && (pos == part.len() || stuck) {
                break;
            }
        }
    }
    finish(out, limit)
}

fn finish(out: Vec<u8>, limit: usize) -> Result<Bytes, InflateError> {
    if out.len() > limit {
        return Err(InflateError::TooBig);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(s: &str) -> Option<Params> {
        negotiate([s.as_bytes()])
    }

    #[test]
    fn negotiation() {
        let plain = Params {
            server_max_window_bits: 15,
            echo_window_bits: false,
        };
        assert_eq!(offer("permessage-deflate"), Some(plain));
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits"),
            Some(plain)
        );
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            Some(plain)
        );
        let p = offer("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(p.server_max_window_bits, 10);
        assert_eq!(
            p.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"12\"")
                .map(|p| p.server_max_window_bits),
            Some(12)
        );
        // Declined: unknown, duplicate, out of range, 8, malformed.
        assert_eq!(offer("permessage-deflate; foo"), None);
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
        assert_eq!(offer("permessage-deflate; server_max_window_bits=16"), None);
        assert_eq!(offer("permessage-deflate; server_max_window_bits=8"), None);
        assert_eq!(offer("permessage-deflate; server_max_window_bits"), None);
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=010"),
            None
        );
        assert_eq!(offer("permessage-deflate; client_max_window_bits=7"), None);
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover=1"),
            None
        );
        assert_eq!(offer("x-webkit-deflate-frame"), None);
        // The first acceptable offer wins.
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9")
                .map(|p| p.server_max_window_bits),
            Some(9)
        );
        assert_eq!(
            negotiate(["x-foo".as_bytes(), "permessage-deflate".as_bytes()]),
            Some(plain)
        );
    }

    #[test]
    fn messages_round_trip_at_every_window_size() {
        let data: Bytes = (0..50_000u32)
            .map(|i| (i * 7 % 61) as u8)
            .collect::<Vec<_>>()
            .into();
        for bits in 9..=15 {
            let z = compress(&data, bits).expect("compressible");
            assert!(z.len() < data.len() / 4);
            assert_eq!(inflate(&z, data.len()).unwrap(), data, "bits {bits}");
        }
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        // 1 MiB of zeros compresses to a few kilobytes: a zip bomb in small.
        let zeros = Bytes::from(vec![0u8; 1 << 20]);
        let z = compress(&zeros, 15).unwrap();
        assert!(z.len() < 16 * 1024, "{}", z.len());
        assert_eq!(inflate(&z, (1 << 20) - 1), Err(InflateError::TooBig));
        assert_eq!(inflate(&z, 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn corrupt_input_is_refused() {
        assert_eq!(inflate(&[0xff; 20], 1 << 20), Err(InflateError::Corrupt));
        // The spare inflater was reset: the next message inflates.
        let text = Bytes::from("{\"k\":\"v\"},".repeat(50));
        let z = compress(&text, 15).unwrap();
        assert_eq!(inflate(&z, 1 << 20).unwrap(), text);
    }

    #[test]
    fn an_empty_message_inflates_to_nothing() {
        // RFC 7692 §7.2.3.6: an empty message is sent as a single 0x00 byte.
        assert_eq!(inflate(&[0x00], 10).unwrap().len(), 0);
    }
}
