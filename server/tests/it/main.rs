//! Integration tests: real handler cdylibs, a real `wshd` process on port 0,
//! real WebSocket clients.

mod common;
mod faults;
mod lifecycle;
mod reload;
mod security_session;
mod serving;
