//! Direct delivery: a topic message written by the publishing thread
//! straight to the socket of a subscriber whose session is idle, instead of
//! being queued in its mailbox and its session task woken to write it.
//!
//! Why: a publish to 1,000 subscribers used to cost 1,000 task wake-ups,
//! each a schedule, a poll of the session's `select!` and a mailbox
//! round-trip before the one `send` that delivers the frame; in the fan-out
//! profile that was about a fifth of the server's CPU per delivery
//! (bench/README.md). Written directly, a delivery is one non-blocking
//! `send(2)` of a frame built once per publish. uWebSockets delivers its
//! publishes the same way.
//!
//! **The door.** A connection's [`Door`] holds its socket's descriptor only
//! while its session is idle: waiting for the next event with nothing
//! queued, nothing half-written and no close begun, on plain TCP without
//! permessage-deflate (TLS and compression keep per-connection state that
//! only the session may touch). The session opens the door right before it
//! waits and closes it right after, under the door's lock, before it writes
//! anything itself or lets go of the socket; a publisher writes only while
//! holding that lock with the door open. So a publisher's frame never lands
//! in the middle of one of the session's, and never goes to a descriptor
//! that was closed (and perhaps reused). Only connections that subscribed
//! to a topic ever open their door, so others pay one atomic load per wait.
//!
//! **Order and limits.** A publisher writes directly only when the mailbox
//! is empty, so a direct frame never overtakes queued messages; publishes
//! to one topic are serialised by the topic's lock, so subscribers see them
//! in order. When the socket does not take the whole frame the rest is left
//! in the door (the *spill*) and the door shuts: the session is woken,
//! writes the spill before anything else, and from then on the usual send
//! queue, `write_timeout` and slow-consumer policy apply. When the socket
//! takes nothing, the message goes to the mailbox as before.

#![allow(unsafe_code)] // one send(2) on a descriptor the door vouches for

use std::os::fd::RawFd;
use std::sync::Mutex;

use bytes::Bytes;

/// One connection's door: see the module doc. Only connections that
/// subscribed to a topic have one ([`crate::mailbox::ConnShared::door`]).
#[derive(Debug, Default)]
pub struct Door {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The open socket while the session is idle; -1 otherwise.
    fd: RawFd,
    /// The part of a frame the socket did not take.
    spill: Option<Bytes>,
    /// Messages and payload bytes delivered through the door since the
    /// session last closed it, for its access line and metrics.
    msgs: u64,
    bytes: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            fd: -1,
            spill: None,
            msgs: 0,
            bytes: 0,
        }
    }
}

/// What the session finds when it closes the door.
#[derive(Debug, Default)]
pub struct Closed {
    /// Bytes of a frame to write before anything else.
    pub spill: Option<Bytes>,
    /// Messages and payload bytes delivered meanwhile.
    pub msgs: u64,
    pub bytes: u64,
}

/// What became of one direct delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The socket took the whole frame.
    Written,
    /// The socket took part of it; the rest waits for the session, which
    /// must be woken.
    Spilled,
    /// Not written: deliver through the mailbox.
    Refused,
}

impl Door {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session is about to wait with its socket `fd` idle: nothing
    /// queued or half-written, no close begun. It must call
    /// [`Door::close`] before it writes to or closes the socket.
    pub fn open(&self, fd: RawFd) {
        let mut s = self.lock();
        debug_assert!(
            s.spill.is_none(),
            "the session took the spill when it closed the door"
        );
        s.fd = fd;
    }

    /// The session woke up: no more direct writes. Waits for one in
    /// progress (a non-blocking `send`) to finish.
    pub fn close(&self) -> Closed {
        let mut s = self.lock();
        s.fd = -1;
        Closed {
            spill: s.spill.take(),
            msgs: std::mem::take(&mut s.msgs),
            bytes: std::mem::take(&mut s.bytes),
        }
    }

    /// Writes `frame` (a whole WebSocket frame carrying `payload_len`
    /// payload bytes) to the socket if the door is open and
    /// `mailbox_empty()` says nothing is queued ahead of it.
    pub fn write(
        &self,
        frame: &Bytes,
        payload_len: usize,
        mailbox_empty: impl FnOnce() -> bool,
    ) -> Outcome {
        // Busy: the session is opening or closing it, or another publisher
        // is writing. Either way the mailbox keeps the order.
        let Ok(mut s) = self.state.try_lock() else {
            return Outcome::Refused;
        };
        if s.fd < 0 || !mailbox_empty() {
            return Outcome::Refused;
        }
        // SAFETY: `s.fd` is the session's open socket: the session sets it
        // only while it holds the socket open and idle, and clears it under
        // this lock (which we hold until the call returns) before it writes
        // to the socket or closes it. `frame` is valid for `frame.len()`
        // bytes. MSG_DONTWAIT: never blocks; MSG_NOSIGNAL: a peer that went
        // away gives EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                s.fd,
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // Nothing taken (EAGAIN, or an error the session will see on its
        // next read or write): shut the door and use the mailbox.
        let n = match usize::try_from(n) {
            Ok(n) if n > 0 => n,
            _ => {
                s.fd = -1;
                return Outcome::Refused;
            }
        };
        s.msgs += 1;
        s.bytes += payload_len as u64;
        if n == frame.len() {
            return Outcome::Written;
        }
        s.spill = Some(frame.slice(n..));
        s.fd = -1;
        Outcome::Spilled
    }
}

/// A door the session opened for one wait. Closing it, explicitly or by
/// dropping it (the session's task dropped mid-wait, at shutdown), happens
/// before the session lets go of its socket: the guard is created after the
/// socket and dropped before it.
pub struct OpenDoor(Option<std::sync::Arc<crate::mailbox::ConnShared>>);

impl OpenDoor {
    /// Opens `shared`'s door on socket `fd` (see [`Door::open`]); `None`
    /// if the connection has no door (never subscribed).
    pub fn new(shared: &std::sync::Arc<crate::mailbox::ConnShared>, fd: RawFd) -> Option<OpenDoor> {
        shared.door()?.open(fd);
        Some(OpenDoor(Some(shared.clone())))
    }

    /// Closes the door and returns what publishers left in it.
    pub fn close(mut self) -> Closed {
        self.0
            .take()
            .and_then(|s| s.door().map(Door::close))
            .unwrap_or_default()
    }
}

impl Drop for OpenDoor {
    fn drop(&mut self) {
        if let Some(door) = self.0.as_ref().and_then(|s| s.door()) {
            // A frame cut short dies with the connection.
            door.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (s, c)
    }

    #[test]
    fn a_closed_door_refuses_and_an_open_one_writes() {
        let (server, mut client) = pair();
        let door = Door::default();
        let frame = Bytes::from_static(b"\x81\x02hi");
        assert_eq!(door.write(&frame, 2, || true), Outcome::Refused);
        door.open(server.as_raw_fd());
        // Something queued in the mailbox goes first.
        assert_eq!(door.write(&frame, 2, || false), Outcome::Refused);
        assert_eq!(door.write(&frame, 2, || true), Outcome::Written);
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x02hi");
        let closed = door.close();
        assert_eq!((closed.msgs, closed.bytes), (1, 2));
        assert!(closed.spill.is_none());
        assert_eq!(door.write(&frame, 2, || true), Outcome::Refused);
    }

    #[test]
    fn a_full_socket_leaves_the_rest_of_the_frame_for_the_session() {
        let (server, client) = pair();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let door = Door::default();
        door.open(server.as_raw_fd());
        // The client never reads: frames go whole until one goes in part.
        let frame = Bytes::from(vec![0x82u8; 64 * 1024]);
        let mut spilled = false;
        for _ in 0..1000 {
            match door.write(&frame, frame.len(), || true) {
                Outcome::Written => continue,
                Outcome::Spilled => {
                    spilled = true;
                    break;
                }
                // The socket took nothing: the door shut with no spill.
                Outcome::Refused => break,
            }
        }
        let closed = door.close();
        if spilled {
            let rest = closed.spill.expect("spill kept");
            assert!(!rest.is_empty() && rest.len() < frame.len());
        } else {
            assert!(closed.spill.is_none());
        }
        // Either way the door is shut until the session opens it again.
        assert_eq!(door.write(&frame, 1, || true), Outcome::Refused);
        drop(client);
    }
}
