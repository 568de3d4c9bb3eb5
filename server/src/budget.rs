//! The server-wide budget for unfinished incoming messages
//! (`max_buffered_bytes`).
//!
//! tungstenite keeps a partly received frame, and the frames of a fragmented
//! message, inside the connection's context until the message is complete.
//! A client that sends most of a big frame and then stops holds that memory
//! for as long as the connection lives. Each connection follows its peer's
//! frames as bytes arrive ([`FrameTracker`]), so it knows how many bytes
//! read from the socket belong to a message that is not complete yet: an
//! upper bound on what tungstenite holds for it beyond its read buffer.
//!
//! Cost on the hot path: a connection publishes its count ([`Meter`]) only
//! when it moves by more than one read buffer or drops to zero, so small
//! messages never touch a shared atomic; the search for the connection
//! holding the most runs only when the total is over the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;

use crate::mailbox::ConnShared;

/// The server-wide count of bytes held by unfinished messages.
#[derive(Debug)]
pub struct Budget {
    /// `max_buffered_bytes`.
    limit: u64,
    /// The sum of every connection's published count.
    total: AtomicU64,
    /// Connections that have published a count at least once, by id. A
    /// connection registers on its first big message, so one that only
    /// ever sends small messages costs nothing here.
    holders: DashMap<u64, Arc<Holder>>,
    /// A sweep is running; others that find the total over the budget
    /// meanwhile leave the work to it.
    sweeping: AtomicBool,
}

/// One connection's published count, shared with the sweep.
#[derive(Debug)]
struct Holder {
    held: AtomicU64,
    /// The sweep picked this connection: its session must free its buffers
    /// and close with 1009.
    over: AtomicBool,
    /// Wakes the session so it sees `over`.
    shared: Arc<ConnShared>,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit: limit as u64,
            total: AtomicU64::new(0),
            holders: DashMap::new(),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Bytes currently counted against the budget.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Picks the connections holding the most until the rest fit the
    /// budget, and wakes each so it closes and frees what it holds. Only
    /// called when the total is over the budget.
    fn sweep(&self) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        let mut live: Vec<(u64, Arc<Holder>)> = Vec::new();
        let mut sum = 0u64;
        for h in self.holders.iter() {
            // Connections picked before still hold their bytes until their
            // sessions run: they are on their way out, so they do not count.
            if h.over.load(Ordering::Relaxed) {
                continue;
            }
            let held = h.held.load(Ordering::Relaxed);
            if held > 0 {
                sum += held;
                live.push((held, h.value().clone()));
            }
        }
        if sum > self.limit {
            live.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
            for (held, h) in live {
                if sum <= self.limit {
                    break;
                }
                sum -= held;
                h.over.store(true, Ordering::Relaxed);
                h.shared.wakeup.wake();
            }
        }
        self.sweeping.store(false, Ordering::Release);
    }
}

/// One connection's side of the budget: publishes what the connection
/// holds and tells it when it was picked to go.
#[derive(Debug)]
pub struct Meter {
    budget: Arc<Budget>,
    id: u64,
    shared: Arc<ConnShared>,
    /// Registered in the budget once the connection first published.
    holder: Option<Arc<Holder>>,
    /// The count last published.
    published: u64,
    /// Changes smaller than this are not published: the read buffer every
    /// connection has anyway.
    granule: u64,
}

impl Meter {
    pub fn new(budget: Arc<Budget>, id: u64, shared: Arc<ConnShared>, granule: usize) -> Meter {
        Meter {
            budget,
            id,
            shared,
            holder: None,
            published: 0,
            granule: granule.max(1) as u64,
        }
    }

    /// Records that the connection now holds `held` bytes of unfinished
    /// messages. Cheap unless the count moved by a read buffer or more.
    pub fn update(&mut self, held: u64) {
        let moved = held.abs_diff(self.published);
        if moved == 0 || (held != 0 && moved < self.granule) {
            return;
        }
        let holder = match &self.holder {
            Some(h) => h,
            None => {
                if held == 0 {
                    return;
                }
                let h = Arc::new(Holder {
                    held: AtomicU64::new(0),
                    over: AtomicBool::new(false),
                    shared: self.shared.clone(),
                });
                self.budget.holders.insert(self.id, h.clone());
                self.holder.insert(h)
            }
        };
        holder.held.store(held, Ordering::Relaxed);
        let total = if held > self.published {
            let d = held - self.published;
            self.budget.total.fetch_add(d, Ordering::Relaxed) + d
        } else {
            let d = self.published - held;
            self.budget.total.fetch_sub(d, Ordering::Relaxed) - d
        };
        self.published = held;
        if total > self.budget.limit {
            self.budget.sweep();
        }
    }

    /// Whether the budget picked this connection to close.
    pub fn over(&self) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|h| h.over.load(Ordering::Relaxed))
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.holder.is_some() {
            self.update(0);
            self.budget.holders.remove(&self.id);
        }
    }
}

/// Follows a client's frames through the bytes read from its socket, to
/// know how many of them belong to a message that is not complete yet.
///
/// Counted: every byte of a frame not yet complete, and every byte of the
/// finished frames of a data message whose last frame has not arrived.
/// Control frames (pings, pongs, close) are counted only while partial:
/// tungstenite hands them over as soon as they are complete.
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Header bytes of the current frame seen so far.
    hdr: [u8; 14],
    hdr_len: u8,
    /// Payload bytes of the current frame still to come, once the header is
    /// complete.
    payload_left: u64,
    in_payload: bool,
    /// Bytes of the current frame so far, header included.
    frame_bytes: u64,
    /// Bytes of the finished frames of the open data message.
    msg_bytes: u64,
    /// A frame or message finished in the bytes fed since the last
    /// [`FrameTracker::take_boundary`].
    boundary: bool,
}

impl FrameTracker {
    /// Bytes that belong to an unfinished frame or message.
    pub fn held(&self) -> u64 {
        self.msg_bytes + self.frame_bytes
    }

    /// Whether a message finished since the last call.
    pub fn take_boundary(&mut self) -> bool {
        std::mem::take(&mut self.boundary)
    }

    /// Follows `buf`, the next bytes read from the socket.
    pub fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.in_payload {
                let n = (buf.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                self.frame_bytes += n;
                buf = &buf[n as usize..];
                if self.payload_left == 0 {
                    self.end_frame();
                }
                continue;
            }
            // Collect the header: 2 bytes, then the extended length and
            // the mask as the second byte announces.
            let need = if self.hdr_len < 2 {
                2
            } else {
                header_len(self.hdr[1])
            };
            let n = (need - self.hdr_len as usize).min(buf.len());
            let at = self.hdr_len as usize;
            self.hdr[at..at + n].copy_from_slice(&buf[..n]);
            self.hdr_len += n as u8;
            self.frame_bytes += n as u64;
            buf = &buf[n..];
            if self.hdr_len >= 2 && self.hdr_len as usize == header_len(self.hdr[1]) {
                self.payload_left = payload_len(&self.hdr);
                self.in_payload = true;
                if self.payload_left == 0 {
                    self.end_frame();
                }
            }
        }
    }

    fn end_frame(&mut self) {
        let opcode = self.hdr[0] & 0x0F;
        let fin = self.hdr[0] & 0x80 != 0;
        // Data frames are opcodes 0x0-0x7 (continuation, text, binary,
        // reserved); control frames 0x8-0xF.
        if opcode < 0x8 {
            if fin {
                self.msg_bytes = 0;
                self.boundary = true;
            } else {
                self.msg_bytes += self.frame_bytes;
            }
        } else if self.msg_bytes == 0 {
            self.boundary = true;
        }
        self.frame_bytes = 0;
        self.hdr_len = 0;
        self.in_payload = false;
    }
}

/// The whole header's length as its second byte announces it.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The payload length from a complete header.
fn payload_len(hdr: &[u8; 14]) -> u64 {
    match hdr[1] & 0x7F {
        126 => u16::from_be_bytes([hdr[2], hdr[3]]) as u64,
        127 => u64::from_be_bytes(hdr[2..10].try_into().expect("8 bytes")),
        n => n as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![first];
        match payload_len {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.resize(f.len() + payload_len, b'x');
        f
    }

    #[test]
    fn whole_messages_leave_nothing_held_whatever_the_split() {
        let mut bytes = frame(0x81, 5);
        bytes.extend(frame(0x82, 300));
        bytes.extend(frame(0x82, 70_000));
        bytes.extend(frame(0x89, 0)); // ping
        for chunk in [1, 2, 3, 7, 64, 1000, bytes.len()] {
            let mut t = FrameTracker::default();
            for c in bytes.chunks(chunk) {
                t.feed(c);
            }
            assert_eq!(t.held(), 0, "chunk {chunk}");
            assert!(t.take_boundary());
        }
    }

    #[test]
    fn a_partial_frame_is_held_until_it_completes() {
        let f = frame(0x82, 1 << 20);
        let mut t = FrameTracker::default();
        t.feed(&f[..1_000_000]);
        assert_eq!(t.held(), 1_000_000);
        assert!(!t.take_boundary());
        t.feed(&f[1_000_000..]);
        assert_eq!(t.held(), 0);
        assert!(t.take_boundary());
    }

    #[test]
    fn fragments_count_until_the_final_one_and_pings_between_do_not_reset() {
        let first = frame(0x02, 1000); // binary, not final
        let ping = frame(0x89, 4);
        let cont = frame(0x00, 1000); // continuation, not final
        let last = frame(0x80, 10); // continuation, final
        let mut t = FrameTracker::default();
        t.feed(&first);
        t.feed(&ping);
        t.feed(&cont);
        assert_eq!(t.held(), (first.len() + cont.len()) as u64);
        assert!(!t.take_boundary());
        t.feed(&last);
        assert_eq!(t.held(), 0);
        assert!(t.take_boundary());
    }
}
