//! wshd handler API (stub; the SDK is being written).
#![allow(non_camel_case_types)]
#[allow(unsafe_code)]
pub mod abi;
