//! Generates the envd message types from `proto/envd/**/*.proto` (recreated from the e2b
//! package, see `proto/envd/README.md`): `protox` compiles the .proto files in pure Rust (no
//! `protoc` on the build machine), `prost-build` writes the structs and `pbjson-build` their
//! proto3-JSON `Serialize`/`Deserialize` (base64 bytes, int64 as strings, enums by name).

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto/envd";
const PROTO_FILES: [&str; 2] = ["process/process.proto", "filesystem/filesystem.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={PROTO_ROOT}/{file}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let descriptor_bytes = descriptors.encode_to_vec();

    let mut config = prost_build::Config::new();
    config
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .out_dir(&out_dir);
    config.compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .extern_path(".google.protobuf", "::pbjson_types")
        // As connect-go (envd) does: fields from a newer SDK are skipped, not refused.
        .ignore_unknown_fields()
        .out_dir(&out_dir)
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
