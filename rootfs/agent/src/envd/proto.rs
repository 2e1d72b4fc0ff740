//! envd's message types, generated at build time from `proto/envd/` (see `build.rs`): prost
//! structs plus pbjson's proto3-JSON serde impls, which is exactly the Connect JSON codec.

#![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]

/// `process.proto`: the `process.Process` service's messages.
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `filesystem.proto`: the `filesystem.Filesystem` service's messages.
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}
