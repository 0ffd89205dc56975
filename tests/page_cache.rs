//! The kernel keeps a resource's pages across opens (FOPEN_KEEP_CACHE) where nothing can
//! have changed them, so a second pass never enters the daemon. These tests try every way a
//! resource's plaintext changes by another path than the reader's, and check that no read
//! through the mount is served from a stale cached page. Real mounts: root and /dev/fuse.

mod common;
use common::mount::*;
use common::*;

use std::os::unix::fs::FileExt;

const MIB: usize = 1 << 20;

/// Read the whole file through the page cache (buffered, a new open each time).
fn read(m: &Mounted, rel: &str) -> Vec<u8> {
    std::fs::read(m.p(rel)).unwrap()
}

/// Bytes the mount's daemon has read so far (`rchar`: every read(2)/pread(2) it made).
fn daemon_read_bytes(m: &Mounted) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", m.daemon_pid().trim())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Write through the page cache (buffered), no fsync.
fn write_at(m: &Mounted, rel: &str, data: &[u8], off: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p(rel))
        .unwrap();
    f.write_all_at(data, off).unwrap();
}

#[test]
fn a_name_reused_from_the_cli_is_never_read_from_stale_pages() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    let a = e.path("a.raw");
    let b = e.path("b.raw");
    let da = write_pattern(&a, 8 * MIB, 1);
    let db = write_pattern(&b, 8 * MIB, 2);
    e.ok(&["import", a.to_str().unwrap(), "images/x", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    assert!(read(&m, "images/x") == da);
    // The second pass (a new open) comes from the kernel's pages: the daemon reads nothing.
    let before = daemon_read_bytes(&m);
    assert!(read(&m, "images/x") == da, "second pass");
    let delta = daemon_read_bytes(&m) - before;
    assert!(
        delta < MIB as u64,
        "the second pass read {delta} bytes in the daemon"
    );
    // Replaced from the CLI by another image of the same size under the same name.
    e.ok(&["delete", "images/x"]);
    e.ok(&["import", b.to_str().unwrap(), "images/x", "--encrypt"]);
    assert!(
        read(&m, "images/x") == db,
        "the old image's pages were read"
    );
    // And once more with an unencrypted one (no header: the payload is the file).
    e.ok(&["delete", "images/x"]);
    e.ok(&["import", a.to_str().unwrap(), "images/x"]);
    assert!(
        read(&m, "images/x") == da,
        "the old image's pages were read"
    );
    m.umount();
}

#[test]
fn a_snapshot_or_copy_after_a_write_holds_the_write_even_under_a_reused_name() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/d", "--size", "8M", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    let mut want = vec![0u8; 8 * MIB];
    let w1 = pattern(MIB, 3);
    write_at(&m, "disks/d", &w1, 3 * MIB as u64 + 512);
    want[3 * MIB + 512..4 * MIB + 512].copy_from_slice(&w1);
    control_write(&m, "snapshot", "disks/d snapshots/s\n");
    control_write(&m, "copy", "disks/d disks/c\n");
    e.ok(&["job", "wait"]);
    for rel in ["disks/d", "snapshots/s", "disks/c"] {
        assert!(read(&m, rel) == want, "{rel}");
        assert!(read(&m, rel) == want, "{rel}, second pass");
    }
    // More writes, then the same names again: the new snapshot and copy hold them, and the
    // mount shows them, not the pages cached from the first ones.
    let w2 = pattern(2 * MIB, 4);
    write_at(&m, "disks/d", &w2, 5 * MIB as u64);
    want[5 * MIB..7 * MIB].copy_from_slice(&w2);
    e.ok(&["delete", "snapshots/s"]);
    e.ok(&["delete", "disks/c"]);
    control_write(&m, "snapshot", "disks/d snapshots/s\n");
    e.ok(&["job", "wait"]);
    e.ok(&["copy", "disks/d", "disks/c"]);
    for rel in ["disks/d", "snapshots/s", "disks/c"] {
        assert!(read(&m, rel) == want, "{rel} after the second write");
    }
    m.umount();
    assert!(read_plain(&e.store, "snapshots/s") == want);
}

#[test]
fn a_disk_re_encrypted_online_reads_every_write_from_before_during_and_after() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/d", "--size", "64M", "--encrypt"]);
    let k = e.key("k2", "AES_256");
    let m = Mounted::new(&e, &[]);
    let mut want = vec![0u8; 64 * MIB];
    let w1 = pattern(16 * MIB, 5);
    write_at(&m, "disks/d", &w1, 0);
    want[..16 * MIB].copy_from_slice(&w1);
    assert!(read(&m, "disks/d") == want, "before");
    // A writer keeps the disk open through the re-encryption and writes while it runs.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    control_write(&m, "rekey", &format!("disks/d key={k} mode=reencrypt\n"));
    for i in 0..8u64 {
        let w = pattern(MIB, 10 + i);
        let off = (20 + 5 * i as usize) * MIB;
        f.write_all_at(&w, off as u64).unwrap();
        want[off..off + MIB].copy_from_slice(&w);
    }
    e.ok(&["job", "wait"]);
    let w3 = pattern(MIB, 30);
    f.write_all_at(&w3, 60 * MIB as u64).unwrap();
    want[60 * MIB..61 * MIB].copy_from_slice(&w3);
    drop(f);
    assert!(e.info("disks/d")["reencrypt"].is_null());
    assert!(read(&m, "disks/d") == want, "after");
    assert!(read(&m, "disks/d") == want, "after, second pass");
    m.umount();
    // And what is stored, read without the mount or its pages, is the same.
    assert!(read_plain(&e.store, "disks/d") == want);
}
