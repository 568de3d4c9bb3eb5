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
//! **Inbound.** tungstenite 0.30 refuses RSV1, so on a connection that
//! negotiated the extension, [`Inflow`] sits between the socket and
//! tungstenite's frame reader: frames of compressed messages are inflated
//! and handed on as ordinary masked frames (mask key 0), everything else
//! passes through unchanged for tungstenite to judge. tungstenite therefore
//! applies `max_message_size` to the *inflated* size and validates UTF-8 on
//! it, and the budget (budget.rs) counts inflated bytes. Inflation is pulled
//! by tungstenite's reads and stops at [`OUT_CAP`] bytes per step, so a zip
//! bomb is cut by `max_message_size` before it costs more than that.
//!
//! **Outbound.** [`compress`] turns one message into the payload of one
//! RSV1 frame. The last result is kept per thread: a topic message queued to
//! many subscribers shares one payload buffer, so it is compressed once per
//! worker thread, not once per subscriber.
//!
//! **Backend.** flate2 on zlib-rs (pure Rust). miniz_oxide cannot compress
//! with a window under 32 KiB, which `server_max_window_bits` needs.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Messages shorter than this are sent uncompressed: the deflate block
/// overhead eats the gain, and compressing costs CPU for nothing.
pub const MIN_COMPRESS: usize = 64;

/// Inflated bytes per frame handed to tungstenite (at most `max_frame_size`).
const CHUNK: usize = 8 * 1024;
/// Transcoded bytes prepared before tungstenite has to take some.
pub const OUT_CAP: usize = 16 * 1024;
/// The compression level: zlib's fastest. Messages are small and latency
/// matters more than the last percent of ratio (JSON still shrinks 4-6x).
const LEVEL: u32 = 1;
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

/// A compressed message being inflated.
struct Inflating {
    z: Decompress,
    /// Text (1) or binary (2).
    opcode: u8,
    /// Its first frame went to tungstenite: later ones are continuations.
    started: bool,
    /// The deflate stream ended (a final block): the rest is ignored.
    ended: bool,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// At a frame boundary.
    Header,
    /// Copying this many bytes through unchanged.
    Pass { left: u64 },
    /// Inflating the payload of a compressed message's frame.
    Deflated {
        left: u64,
        mask: [u8; 4],
        /// Offset in the payload of `raw[0]`, for the mask.
        pos: usize,
        fin: bool,
    },
    /// The message's last frame is in: feeding the stripped tail.
    Tail { fed: usize },
}

/// The inbound side of a compressed connection: socket bytes in,
/// frames tungstenite can read out (see the module doc).
pub struct Inflow {
    /// Socket bytes not processed yet.
    raw: Vec<u8>,
    /// Bytes at the start of `raw` already unmasked.
    unmasked: usize,
    /// Frames ready for tungstenite, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    msg: Option<Inflating>,
    /// Frames handed on are at most this long.
    chunk: usize,
    /// Compressed frames over this are passed on for tungstenite to refuse.
    max_frame: usize,
}

impl std::fmt::Debug for Inflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflow")
            .field("raw", &self.raw.len())
            .field("out", &(self.out.len() - self.out_pos))
            .field("state", &self.state)
            .field("in_message", &self.msg.is_some())
            .finish()
    }
}

impl Inflow {
    /// `early`: bytes the client sent right after its handshake.
    pub fn new(max_frame: usize, early: Option<Vec<u8>>) -> Inflow {
        Inflow {
            raw: early.unwrap_or_default(),
            unmasked: 0,
            out: Vec::new(),
            out_pos: 0,
            state: State::Header,
            msg: None,
            chunk: CHUNK.min(max_frame.max(1)),
            max_frame,
        }
    }

    /// Fills `buf` with transcoded frames, reading socket bytes through
    /// `src` as needed. Errors (`WouldBlock` included) are `src`'s.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        src: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.out_pos < self.out.len() {
                let n = buf.len().min(self.out.len() - self.out_pos);
                buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                return Ok(n);
            }
            self.out.clear();
            self.out_pos = 0;
            while self.out.len() < OUT_CAP && self.step() {}
            if !self.out.is_empty() {
                continue;
            }
            let mut tmp = [0u8; 4096];
            match src(&mut tmp) {
                Ok(0) => return Ok(0),
                Ok(n) => self.raw.extend_from_slice(&tmp[..n]),
                Err(e) => {
                    if self.raw.is_empty() && self.msg.is_none() {
                        // Idle: hold no buffers.
                        self.raw = Vec::new();
                        self.out = Vec::new();
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One step of transcoding; false when more input is needed.
    fn step(&mut self) -> bool {
        match self.state {
            State::Header => self.header(),
            State::Pass { left } => {
                let n = self
                    .raw
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                if n == 0 {
                    return false;
                }
                self.out.extend_from_slice(&self.raw[..n]);
                self.raw.drain(..n);
                self.state = match left - n as u64 {
                    0 => State::Header,
                    left => State::Pass { left },
                };
                true
            }
            State::Deflated {
                left,
                mask,
                pos,
                fin,
            } => self.inflate(left, mask, pos, fin),
            State::Tail { fed } => self.tail(fed),
        }
    }

    fn header(&mut self) -> bool {
        let r = &self.raw;
        if r.len() < 2 {
            return false;
        }
        let (b0, b1) = (r[0], r[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let rsv23 = b0 & 0x30 != 0;
        let op = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (len, mut hlen) = match b1 & 0x7f {
            126 if r.len() >= 4 => (u64::from(u16::from_be_bytes([r[2], r[3]])), 4),
            127 if r.len() >= 10 => (
                u64::from_be_bytes(r[2..10].try_into().expect("8 bytes")),
                10,
            ),
            126 | 127 => return false,
            n => (u64::from(n), 2),
        };
        if masked {
            hlen += 4;
        }
        if r.len() < hlen {
            return false;
        }
        let data = op == 1 || op == 2;
        if data && self.msg.is_some() {
            // A new message inside a compressed one. tungstenite has not
            // necessarily seen the compressed one start, so it could not
            // tell: fail here.
            self.fail();
            return true;
        }
        let first = data && rsv1;
        let cont = op == 0 && self.msg.is_some();
        let ours = (first || cont) && masked && !rsv23 && !(cont && rsv1);
        if ours && len <= self.max_frame as u64 {
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&r[hlen - 4..hlen]);
            if first {
                self.msg = Some(Inflating {
                    z: take_inflater(),
                    opcode: op,
                    started: false,
                    ended: false,
                });
            }
            self.raw.drain(..hlen);
            self.unmasked = 0;
            self.state = State::Deflated {
                left: len,
                mask,
                pos: 0,
                fin,
            };
        } else {
            if ours {
                // Too big: without RSV1 tungstenite refuses it for its
                // size (1009), as it would an uncompressed one.
                self.raw[0] &= !0x40;
            }
            // Anything else is tungstenite's to accept or refuse: control
            // frames, uncompressed messages, and every protocol error
            // (RSV1 where it does not belong, unmasked frames...).
            self.state = State::Pass {
                left: hlen as u64 + len,
            };
        }
        true
    }

    fn inflate(&mut self, left: u64, mask: [u8; 4], pos: usize, fin: bool) -> bool {
        let avail = self
            .raw
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        if avail == 0 && left > 0 {
            return false;
        }
        for (i, b) in self.raw[self.unmasked..avail].iter_mut().enumerate() {
            *b ^= mask[(pos + self.unmasked + i) & 3];
        }
        self.unmasked = self.unmasked.max(avail);
        let mut buf = [0u8; CHUNK];
        let buf = &mut buf[..self.chunk];
        let msg = self.msg.as_mut().expect("inflating a message");
        let (consumed, produced) = if msg.ended {
            (avail, 0)
        } else {
            let (i0, o0) = (msg.z.total_in(), msg.z.total_out());
            let st = msg
                .z
                .decompress(&self.raw[..avail], buf, FlushDecompress::None);
            let consumed = (msg.z.total_in() - i0) as usize;
            let produced = (msg.z.total_out() - o0) as usize;
            match st {
                Ok(Status::StreamEnd) => {
                    msg.ended = true;
                    (avail, produced)
                }
                Ok(_) if consumed == 0 && produced == 0 && avail > 0 => {
                    self.fail();
                    return true;
                }
                Ok(_) => (consumed, produced),
                Err(_) => {
                    self.fail();
                    return true;
                }
            }
        };
        if produced > 0 {
            self.emit(&buf[..produced], false);
        }
        self.raw.drain(..consumed);
        self.unmasked -= consumed;
        let left = left - consumed as u64;
        self.state = match (left, fin) {
            (0, true) => State::Tail { fed: 0 },
            (0, false) => State::Header,
            _ => State::Deflated {
                left,
                mask,
                pos: pos + consumed,
                fin,
            },
        };
        true
    }

    fn tail(&mut self, fed: usize) -> bool {
        let mut buf = [0u8; CHUNK];
        let buf = &mut buf[..self.chunk];
        let msg = self.msg.as_mut().expect("inflating a message");
        let mut fed = fed;
        let mut produced = 0;
        if !msg.ended {
            let (i0, o0) = (msg.z.total_in(), msg.z.total_out());
            let st = msg.z.decompress(&TAIL[fed..], buf, FlushDecompress::Sync);
            fed += (msg.z.total_in() - i0) as usize;
            produced = (msg.z.total_out() - o0) as usize;
            match st {
                Ok(Status::StreamEnd) => msg.ended = true,
                Ok(_) => {}
                Err(_) => {
                    self.fail();
                    return true;
                }
            }
        }
        let done = msg.ended || (fed == TAIL.len() && produced < buf.len());
        if done {
            self.emit(&buf[..produced], true);
            let msg = self.msg.take().expect("inflating a message");
            give_back(msg.z);
            self.state = State::Header;
        } else {
            if produced > 0 {
                self.emit(&buf[..produced], false);
            } else if fed < TAIL.len() {
                // No progress on a tail that is not fully in: corrupt.
                self.fail();
                return true;
            }
            self.state = State::Tail { fed };
        }
        true
    }

    /// Hands `payload` to tungstenite as a masked frame (mask key 0).
    fn emit(&mut self, payload: &[u8], fin: bool) {
        let msg = self.msg.as_mut().expect("inflating a message");
        let op = if msg.started { 0 } else { msg.opcode };
        msg.started = true;
        self.out.push(if fin { 0x80 } else { 0 } | op);
        let n = payload.len();
        if n < 126 {
            self.out.push(0x80 | n as u8);
        } else if n <= 0xffff {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&[0; 4]);
        self.out.extend_from_slice(payload);
    }

    /// The compressed data is corrupt (or the framing around it is): hand
    /// tungstenite a frame with RSV2 set, which it refuses as a protocol
    /// error (1002), then pass the rest through (it reads no further).
    fn fail(&mut self) {
        self.out
            .extend_from_slice(&[0x80 | 0x20 | 0x2, 0x80, 0, 0, 0, 0]);
        self.msg = None;
        self.state = State::Pass { left: u64::MAX };
    }

    /// Whether a compressed message is unfinished.
    pub fn in_message(&self) -> bool {
        self.msg.is_some()
    }
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

    /// A client frame: masked with `key`.
    fn frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        f
    }

    /// Runs `input` through an Inflow, `piece` bytes per socket read, and
    /// parses what comes out into (first byte, unmasked payload) frames.
    fn transcode(input: &[u8], piece: usize, max_frame: usize) -> Vec<(u8, Vec<u8>)> {
        let mut inflow = Inflow::new(max_frame, None);
        let mut at = 0;
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let mut src = |b: &mut [u8]| {
                let n = piece.min(b.len()).min(input.len() - at);
                b[..n].copy_from_slice(&input[at..at + n]);
                at += n;
                Ok(n)
            };
            let n = inflow.read(&mut buf, &mut src).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let mut frames = Vec::new();
        let mut r = &out[..];
        while !r.is_empty() {
            let (len, h) = match r[1] & 0x7f {
                126 => (u16::from_be_bytes([r[2], r[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(r[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let key = &r[h..h + 4];
            let p = r[h + 4..h + 4 + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            frames.push((r[0], p));
            if r[0] & 0x20 != 0 {
                break; // a failure marker: the rest is passed through raw
            }
            r = &r[h + 4 + len..];
        }
        frames
    }

    fn joined(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        frames.iter().flat_map(|(_, p)| p.clone()).collect()
    }

    #[test]
    fn compressed_messages_come_out_inflated_in_any_read_pieces() {
        let text: Bytes = "{\"hello\": \"world\"} ".repeat(2000).into();
        let z = compress(&text, 15).expect("compressible");
        assert!(z.len() < text.len() / 10);
        // Fragmented into two frames, with a ping between them.
        let (a, b) = z.split_at(z.len() / 2);
        let mut input = frame(0x41, a, [1, 2, 3, 4]);
        input.extend(frame(0x89, b"hi", [5, 6, 7, 8]));
        input.extend(frame(0x80, b, [9, 10, 11, 12]));
        input.extend(frame(0x82, b"plain", [1, 1, 1, 1]));
        for piece in [1, 3, 7, 100, 5000] {
            let frames = transcode(&input, piece, 1 << 20);
            let ping = frames.iter().position(|f| f.0 == 0x89).unwrap();
            let last = frames
                .iter()
                .position(|f| f.0 & 0x80 != 0 && f.0 & 0xf == 0)
                .unwrap();
            assert!(ping < last);
            let msg: Vec<_> = frames[..=last]
                .iter()
                .filter(|f| f.0 != 0x89)
                .cloned()
                .collect();
            assert_eq!(msg[0].0 & 0x0f, 1, "first frame is text");
            assert!(msg[1..].iter().all(|f| f.0 & 0x0f == 0));
            assert!(msg.iter().all(|f| f.0 & 0x70 == 0), "no RSV bits");
            assert!(msg.iter().all(|f| f.1.len() <= CHUNK));
            assert_eq!(joined(&msg), text.as_ref(), "piece {piece}");
            assert_eq!(frames.last().unwrap(), &(0x82, b"plain".to_vec()));
        }
    }

    #[test]
    fn frames_are_at_most_max_frame_size() {
        let data: Bytes = vec![b'a'; 10_000].into();
        let z = compress(&data, 15).unwrap();
        let frames = transcode(&frame(0xc2, &z, [7, 7, 7, 7]), 4096, 1000);
        assert!(frames.iter().all(|f| f.1.len() <= 1000));
        assert_eq!(joined(&frames), data.as_ref());
    }

    #[test]
    fn corrupt_data_becomes_a_frame_with_rsv2() {
        let frames = transcode(&frame(0xc1, &[0xff; 20], [1, 2, 3, 4]), 4096, 1 << 20);
        assert!(frames.iter().any(|f| f.0 & 0x20 != 0));
    }

    #[test]
    fn small_window_output_inflates() {
        let data: Bytes = (0..50_000u32)
            .map(|i| (i * 7 % 61) as u8)
            .collect::<Vec<_>>()
            .into();
        for bits in 9..=15 {
            let z = compress(&data, bits).expect("compressible");
            let mut d = Decompress::new_with_window_bits(false, bits);
            let mut out = Vec::with_capacity(data.len() + 16);
            let mut input = z.to_vec();
            input.extend_from_slice(&TAIL);
            d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, data.as_ref(), "bits {bits}");
        }
    }
}
