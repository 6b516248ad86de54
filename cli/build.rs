//! Links `skiff` as a position-dependent executable on Linux, as Go links the Kubernetes
//! binaries.
//!
//! A position-independent executable is relocated by the dynamic loader at every start: each
//! pointer in its read-only data (vtables, static tables, panic locations) is rewritten, so
//! every page of `.data.rel.ro` and the GOT becomes private anonymous memory, and the loader
//! reads the whole relocation table (`.rela.dyn`, hundreds of thousands of entries) to do it.
//! All of that stayed resident in every idle `skiff` process. Linked at a fixed address, that
//! data is mapped from the file, only the pages used are read, and there is nothing to
//! relocate. The objects themselves stay position-independent code; only the link changes
//! (rustc passes `-pie` before this argument, and the last of the two wins).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
