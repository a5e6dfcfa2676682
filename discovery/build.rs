//! etcd-client compiles etcd's protobuf files with `protoc` in its own build script.
//! `.cargo/config.toml` points `PROTOC` at `protoc/protoc`, a wrapper that runs the binary
//! shipped in the protoc-bin-vendored crates; this build-dependency is what makes cargo
//! download them before any build script runs. Here we only say so when the platform has no
//! vendored binary, so the wrapper's fallback to a system `protoc` is not a surprise.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(error) = protoc_bin_vendored::protoc_bin_path() {
        println!(
            "cargo:warning=no vendored protoc for this platform ({error}); etcd-client's build needs `protoc` on PATH"
        );
    }
}
