//! Integration tests: real handler cdylibs, a real `wshd` process on port 0,
//! real WebSocket clients.

mod auth;
mod cluster;
mod cluster_docs;
mod codec;
mod common;
mod compression;
mod faults;
mod fuzz;
mod handover;
mod install;
mod lifecycle;
mod metrics;
mod operator;
mod reload;
mod rollout;
mod security_accept;
mod security_config;
mod security_edges;
mod security_load;
mod security_send;
mod security_session;
mod serving;
mod tls;
mod topics;
