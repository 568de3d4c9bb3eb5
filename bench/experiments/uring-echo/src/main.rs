//! An experiment: the least a WebSocket echo server can do per message on
//! io_uring, to measure whether moving wshd's data path from epoll to
//! io_uring could meet issue #17's CPU target (0.95x fastwebsockets per
//! echo). See README.md next to this file for the result.
//!
//! One thread, one ring. Reads are multishot `recv`s into a ring of
//! provided buffers (no re-arming per message, no syscall per read), writes
//! are `send`s, and everything queued in one turn is submitted with one
//! `io_uring_enter`. It answers only what `wsbench echo` and `wsbench
//! handshake` send: an HTTP upgrade, masked single-frame messages and a
//! close. There are no limits, no timeouts and no error handling worth the
//! name: do not serve anything with it.
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

/// What a completion is for: the accept, or the connection (its fd in the
/// high bits) and the operation.
const ACCEPT: u64 = u64::MAX;
const RECV: u64 = 0;
const SEND: u64 = 1;
const CLOSE: u64 = 2;

fn user_data(fd: RawFd, op: u64) -> u64 {
    ((fd as u64) << 8) | op
}

/// Provided receive buffers: `COUNT` buffers of `SIZE` bytes, handed to the
/// kernel through a registered buffer ring (group 0).
const COUNT: u16 = 1024;
const SIZE: usize = 4096;

struct Buffers {
    ring: *mut types::BufRingEntry,
    pool: Vec<u8>,
    tail: u16,
}

impl Buffers {
    fn register(uring: &IoUring) -> Buffers {
        let layout = std::alloc::Layout::from_size_align(COUNT as usize * 16, 4096).unwrap();
        // SAFETY: the layout has a non-zero size. The memory is never freed:
        // the kernel reads it for the life of the ring, which is the
        // process's.
        let ring = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        assert!(!ring.is_null());
        let mut b = Buffers {
            ring,
            pool: vec![0; COUNT as usize * SIZE],
            tail: 0,
        };
        // SAFETY: `ring` is page-aligned, zeroed and COUNT entries long, as
        // io_uring_register_buf_ring(3) requires, and outlives the ring.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, COUNT, 0, 0)
                .expect("register the buffer ring (Linux 5.19 or later)")
        };
        for bid in 0..COUNT {
            b.give_back(bid);
        }
        b
    }

    /// The bytes the kernel put in buffer `bid`.
    fn get(&self, bid: u16, len: usize) -> &[u8] {
        &self.pool[bid as usize * SIZE..bid as usize * SIZE + len]
    }

    /// Returns buffer `bid` to the kernel.
    fn give_back(&mut self, bid: u16) {
        let addr = self.pool.as_mut_ptr() as u64 + bid as u64 * SIZE as u64;
        // SAFETY: the slot at `tail` is one the kernel has consumed (there
        // are COUNT buffers and COUNT slots), so writing it races with
        // nothing; the tail is published with a release store after it.
        unsafe {
            let e = &mut *self.ring.add((self.tail & (COUNT - 1)) as usize);
            e.set_addr(addr);
            e.set_len(SIZE as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

struct Conn {
    fd: RawFd,
    /// Received bytes not yet parsed (the request, or a partial frame).
    input: Vec<u8>,
    upgraded: bool,
    /// What to send; appended to only while no send is in flight, since
    /// the kernel reads it then.
    out: Vec<u8>,
    sent: usize,
    sending: bool,
    closing: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    if let Some(i) = args.iter().position(|a| a == "--addr-file") {
        let f = &args[i + 1];
        let mut t = std::fs::File::create(format!("{f}.tmp")).unwrap();
        write!(t, "{}", listener.local_addr().unwrap()).unwrap();
        std::fs::rename(format!("{f}.tmp"), f).unwrap();
    }
    let mut uring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .unwrap();
    let mut bufs = Buffers::register(&uring);
    let lfd = listener.as_raw_fd();
    let accept = || {
        opcode::AcceptMulti::new(types::Fd(lfd))
            .build()
            .user_data(ACCEPT)
    };
    let recv = |fd: RawFd| {
        opcode::RecvMulti::new(types::Fd(fd), 0)
            .build()
            .user_data(user_data(fd, RECV))
    };
    let close = |fd: RawFd| {
        opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(user_data(fd, CLOSE))
    };
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut queued: Vec<squeue::Entry> = vec![accept()];
    loop {
        {
            let mut sq = uring.submission();
            for e in queued.drain(..) {
                // SAFETY: every buffer an entry points to (`Conn::out`) stays
                // put until its completion: `out` is not touched while
                // `sending`, and a connection is dropped only when no send
                // is in flight.
                unsafe { sq.push(&e).expect("submission queue full") };
            }
        }
        uring.submit_and_wait(1).unwrap();
        let done: Vec<(u64, i32, u32)> = uring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in done {
            if ud == ACCEPT {
                if res >= 0 {
                    conns.insert(
                        res,
                        Conn {
                            fd: res,
                            input: Vec::with_capacity(SIZE),
                            upgraded: false,
                            out: Vec::with_capacity(SIZE),
                            sent: 0,
                            sending: false,
                            closing: false,
                        },
                    );
                    queued.push(recv(res));
                }
                if !cqueue::more(flags) {
                    queued.push(accept());
                }
                continue;
            }
            let fd = (ud >> 8) as RawFd;
            let Some(c) = conns.get_mut(&fd) else {
                continue;
            };
            match ud & 0xff {
                RECV => {
                    if res <= 0 {
                        // The peer left (or no buffer was free: this
                        // experiment drops the connection then).
                        if !c.sending {
                            conns.remove(&fd);
                            queued.push(close(fd));
                        } else {
                            c.closing = true;
                        }
                        continue;
                    }
                    let bid = cqueue::buffer_select(flags).expect("a provided buffer");
                    c.input.extend_from_slice(bufs.get(bid, res as usize));
                    bufs.give_back(bid);
                    if !c.sending {
                        respond(c);
                        if !c.out.is_empty() {
                            c.sending = true;
                            queued.push(send(c));
                        }
                    }
                    if !cqueue::more(flags) && !c.closing {
                        queued.push(recv(fd));
                    }
                }
                SEND => {
                    c.sent += res.max(0) as usize;
                    if res > 0 && c.sent < c.out.len() {
                        queued.push(send(c));
                        continue;
                    }
                    c.out.clear();
                    c.sent = 0;
                    c.sending = false;
                    if res < 0 || c.closing {
                        conns.remove(&fd);
                        queued.push(close(fd));
                        continue;
                    }
                    // Messages that arrived while the send was in flight.
                    respond(c);
                    if !c.out.is_empty() {
                        c.sending = true;
                        queued.push(send(c));
                    }
                }
                _ => {}
            }
        }
    }
}

fn send(c: &Conn) -> squeue::Entry {
    let b = &c.out[c.sent..];
    opcode::Send::new(types::Fd(c.fd), b.as_ptr(), b.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(c.fd, SEND))
}

/// Answers what `input` holds: the upgrade, then every whole frame.
fn respond(c: &mut Conn) {
    if !c.upgraded {
        let Some(end) = c.input.windows(4).position(|w| w == b"\r\n\r\n") else {
            return;
        };
        let request = String::from_utf8_lossy(&c.input[..end]);
        let key = request
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        let mut h = Sha1::new();
        h.update(key.as_bytes());
        h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        use base64::Engine;
        let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());
        write!(
            c.out,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .unwrap();
        c.input.drain(..end + 4);
        c.upgraded = true;
    }
    let mut at = 0;
    while !c.closing {
        let b = &c.input[at..];
        if b.len() < 2 {
            break;
        }
        let opcode = b[0] & 0x0f;
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        let mask_len = if b[1] & 0x80 != 0 { 4 } else { 0 };
        if b.len() < header + mask_len + len {
            break;
        }
        let mut mask = [0u8; 4];
        mask[..mask_len].copy_from_slice(&b[header..header + mask_len]);
        let payload = &b[header + mask_len..header + mask_len + len];
        c.out.push(0x80 | opcode);
        match len {
            0..=125 => c.out.push(len as u8),
            126..=65535 => {
                c.out.push(126);
                c.out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                c.out.push(127);
                c.out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let start = c.out.len();
        c.out.extend_from_slice(payload);
        for (i, x) in c.out[start..].iter_mut().enumerate() {
            *x ^= mask[i & 3];
        }
        c.closing = opcode == 8;
        at += header + mask_len + len;
    }
    c.input.drain(..at);
}
