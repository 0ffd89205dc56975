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

/// Each MiB where `got` is not `want`: how many of its 4 KiB sectors differ, and how many of
/// those read as zeros (a write lost, rather than one read under the wrong key).
fn differing(got: &[u8], want: &[u8]) -> Vec<String> {
    fn sector(b: &[u8], i: usize) -> &[u8] {
        &b[i * 4096..(i + 1) * 4096]
    }
    (0..want.len() / MIB)
        .filter(|i| got[i * MIB..(i + 1) * MIB] != want[i * MIB..(i + 1) * MIB])
        .map(|i| {
            let bad: Vec<usize> = (i * 256..(i + 1) * 256)
                .filter(|&s| sector(got, s) != sector(want, s))
                .collect();
            let zeros = bad
                .iter()
                .filter(|&&s| sector(got, s).iter().all(|&b| b == 0))
                .count();
            format!(
                "MiB {i}: {} sectors differ, {zeros} of them zeros",
                bad.len()
            )
        })
        .collect()
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

/// A job of the mount's own that opens a resource (an online re-encryption) is not a kernel
/// open: it must not make the kernel keep pages it has of another resource that had the
/// name before. Before, the job's open took the place of the kernel's check, and its close
/// recorded the new resource as the one the kernel last saw: the next read got the old
/// resource's pages.
#[test]
fn a_job_opening_a_reused_name_does_not_keep_the_old_pages() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    let k = e.key("k2", "AES_256");
    let a = e.path("a.raw");
    let b = e.path("b.raw");
    let da = write_pattern(&a, 8 * MIB, 11);
    let db = write_pattern(&b, 8 * MIB, 12);
    e.ok(&["import", a.to_str().unwrap(), "disks/d", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    assert!(read(&m, "disks/d") == da);
    e.ok(&["delete", "disks/d"]);
    e.ok(&["import", b.to_str().unwrap(), "disks/d", "--encrypt"]);
    control_write(&m, "rekey", &format!("disks/d key={k} mode=reencrypt\n"));
    e.ok(&["job", "wait"]);
    assert!(read(&m, "disks/d") == db, "the old disk's pages were read");
    assert!(read(&m, "disks/d") == db, "second pass");
    // A first kernel open while the job may still hold it open is checked too.
    e.ok(&["delete", "disks/d"]);
    e.ok(&["import", a.to_str().unwrap(), "disks/d", "--encrypt"]);
    assert!(read(&m, "disks/d") == da);
    e.ok(&["delete", "disks/d"]);
    e.ok(&["import", b.to_str().unwrap(), "disks/d", "--encrypt"]);
    control_write(&m, "rekey", &format!("disks/d key={k} mode=reencrypt\n"));
    assert!(
        read(&m, "disks/d") == db,
        "the old disk's pages were read during the job"
    );
    e.ok(&["job", "wait"]);
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
    let bad = differing(&read_plain(&e.store, "disks/d"), &want);
    assert!(bad.is_empty(), "stored: {bad:?}");
}

/// Online re-encryption under load: one writer (whole, large, small and unaligned writes,
/// some fsync'd) while two readers stream the disk and read it at random (the daemon's
/// read-ahead, its sector cache and its read-modify-write all cross the moving checkpoint).
/// Every write is read back through the mount, and from the store without it.
/// `ENCIMG_TEST_ROUNDS` repeats it (a stress run).
#[test]
fn a_disk_re_encrypted_under_mixed_reads_and_writes_keeps_every_write() {
    if !can_mount() {
        return;
    }
    let rounds = std::env::var("ENCIMG_TEST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64);
    for round in 0..rounds {
        let e = Env::new();
        e.ok(&["create", "disks/d", "--size", "64M", "--encrypt"]);
        let k = e.key("k2", "AES_256");
        let m = Mounted::new(&e, &[]);
        let mut want = vec![0u8; 64 * MIB];
        let w1 = pattern(40 * MIB, 5 + round);
        write_at(&m, "disks/d", &w1, 0);
        want[..40 * MIB].copy_from_slice(&w1);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p("disks/d"))
            .unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        control_write(&m, "rekey", &format!("disks/d key={k} mode=reencrypt\n"));
        let path = m.p("disks/d");
        std::thread::scope(|t| {
            t.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::read(&path);
                }
            });
            t.spawn(|| {
                let g = std::fs::File::open(&path).unwrap();
                let mut b = vec![0u8; 4096];
                let mut x = 12345u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let _ = g.read_at(&mut b, (x >> 20) % (64 * MIB as u64 - 4096));
                }
            });
            let mut x = 777u64 + round;
            for i in 0..400u64 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = match i % 4 {
                    0 => MIB,
                    1 => 4096,
                    2 => 256 << 10,
                    _ => 1000 + (x as usize % 9000),
                };
                let off = ((x >> 16) as usize) % (64 * MIB - len);
                let off = if i % 4 == 3 { off } else { off & !4095 };
                let w = pattern(len, 100 + i + round * 1000);
                f.write_all_at(&w, off as u64).unwrap();
                want[off..off + len].copy_from_slice(&w);
                if i % 50 == 0 {
                    f.sync_data().unwrap();
                }
            }
            e.ok(&["job", "wait"]);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        f.sync_all().unwrap();
        drop(f);
        assert!(e.info("disks/d")["reencrypt"].is_null());
        let through = read(&m, "disks/d");
        m.umount();
        let (bad, badm) = (
            differing(&read_plain(&e.store, "disks/d"), &want),
            differing(&through, &want),
        );
        assert!(
            bad.is_empty() && badm.is_empty(),
            "round {round}: stored: {bad:?}; through the mount: {badm:?}"
        );
    }
}
