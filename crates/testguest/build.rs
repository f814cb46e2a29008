//! Builds the freestanding test guest (../../guest, its own workspace) with the same toolchain,
//! so that `cargo build` of tern also produces the guest kernel its tests and demo boot.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../../guest");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    for path in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "tern-test-guest",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags and target settings are for tern, not for a bare-metal kernel.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(status.success(), "building the test guest failed");

    let elf = target_dir.join("release/tern-test-guest");
    println!("cargo:rustc-env=TERN_TEST_GUEST_ELF={}", elf.display());
}
