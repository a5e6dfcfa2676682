//! Link step of the gateway binary.
//!
//! `-z pack-relative-relocs` stores the executable's relative relocations as DT_RELR, a
//! bitmap, instead of one 24-byte `Elf64_Rela` each: about 1 MiB of relocations that the
//! loader reads at every start, and so 1 MiB of resident memory. It needs GNU ld 2.38 or
//! newer (or lld) and glibc 2.36 or newer at run time, which is what Debian 12 has.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
