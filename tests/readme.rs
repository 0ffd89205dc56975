//! The README's examples run as written: every ```sh block that starts with
//! `export ENCIMG_STORE=/tmp/encimg-store` is run, in README order, line by line in one
//! shell, with its `/tmp/encimg-*`, `/tmp/enc` and `/tmp/demo` paths moved into a temporary
//! directory and the `encimg` just built first on PATH. A line must succeed, unless its
//! comment says `# refused`, in which case it must fail. Blocks that mount run where real
//! mounts can (root, /dev/fuse).

mod common;
use common::mount::*;

use std::path::Path;
use std::process::Command;

/// The runnable blocks of the README, in order.
fn blocks() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match (&mut cur, line) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(b), "```") => {
                if b.starts_with("export ENCIMG_STORE=/tmp/encimg-store") {
                    out.push(std::mem::take(b));
                }
                cur = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// A block as a script that stops at the first line that does not do what it says.
fn script(block: &str, tmp: &Path, kmip_port: u16) -> String {
    let t = tmp.display();
    let block = block
        .replace("/tmp/encimg-store", &format!("{t}/store"))
        .replace("/tmp/encimg-kmip", &format!("{t}/kmip"))
        .replace("/tmp/encimg-hsm", &format!("{t}/hsm"))
        .replace("5696", &kmip_port.to_string())
        .replace("/tmp/encimg-eu1", &format!("{t}/eu1"))
        .replace("/tmp/enc", &format!("{t}/enc"))
        .replace("/tmp/demo", &format!("{t}/demo"));
    let mut s = String::from("set -u\n");
    for line in block.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let quoted = l.replace('\'', "'\\''");
        if l.contains("# refused") {
            s.push_str(&format!(
                "if {{\n{l}\n}} >/dev/null 2>&1; then echo 'README line should have been refused: {quoted}' >&2; exit 1; fi\n"
            ));
        } else {
            s.push_str(&format!(
                "{{\n{l}\n}} >/dev/null || {{ echo 'README line failed: {quoted}' >&2; exit 1; }}\n"
            ));
        }
    }
    s
}

#[test]
fn the_readme_examples_run_as_written() {
    for tool in ["mkfs.ext4", "qemu-img", "jq", "python3"] {
        if !have(tool) {
            eprintln!("SKIPPED: needs {tool} (contrib/test.sh installs it)");
            return;
        }
    }
    let blocks = blocks();
    assert!(blocks.len() >= 4, "the README lost its runnable examples");
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_encimg")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mounts = can_mount();
    let mnt = tmp.path().join("enc");
    // A free port for the KMIP server of the key-services block.
    let kmip_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stop_kmip = || {
        let _ = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kms/pykmip-server.sh"))
            .arg("--stop")
            .arg(tmp.path().join("kmip"))
            .status();
    };
    for block in &blocks {
        let needs = [
            ("encimg mount", mounts, "root and /dev/fuse"),
            ("pykmip-server.sh", have("pykmip-server"), "python3-pykmip"),
            ("softhsm-token.sh", have("softhsm2-util"), "softhsm2"),
        ];
        if let Some((_, _, what)) = needs.iter().find(|(m, ok, _)| block.contains(m) && !ok) {
            eprintln!(
                "SKIPPED a README block that needs {what}: {}",
                block.lines().nth(1).unwrap_or("")
            );
            continue;
        }
        let o = Command::new("bash")
            .arg("-c")
            .arg(script(block, tmp.path(), kmip_port))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PATH", &path)
            .env_remove("ENCIMG_PASSPHRASE")
            .env_remove("ENCIMG_REGION")
            .output()
            .unwrap();
        // Whatever the block did, its KMIP server stops with it.
        stop_kmip();
        if !o.status.success() {
            let _ = Command::new("umount").arg(tmp.path().join("demo")).status();
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&mnt)
                .status();
        }
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert!(!is_mounted(&mnt), "the README's mount block left its mount");
}
