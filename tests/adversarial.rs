//! The attacks of the hardening round, each tried as an adversarial user would: through the
//! CLI and through a real mount. Every test here failed before its fix.
//!
//! 1. Two mounts of one store (lost fsync'd writes): the second is refused.
//! 2. A rewrap from the CLI under an open file: key state follows the header on disk.
//! 3. Keys outliving their use: gone from the daemon's memory after close; no core dump;
//!    the passphrase out of `/proc/PID/environ`.
//! 4. FIFOs and symbolic links in the store: damage, never a hang or a followed link.
//! 5. Truncated payloads, wrong kinds, unreadable headers: damage, loud and local.
//! 6. Out of space, files too large, directories and devices as input: exit codes that
//!    name the operation and the path.
//! 7. Leftovers: no temporary files after failures, refused jobs still listed, a copy's
//!    source cannot be deleted under it.
//! 8. Input: weak or blocking key material, empty imports, loose permissions, another
//!    user's store.
//!
//! Tests that mount need root, /dev/fuse and fusermount3 (CI has them); they say so and skip
//! where those are missing. Everything they start or mount is stopped or unmounted.

mod common;
use common::mount::*;
use common::*;

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn open_errno(p: &Path) -> Option<i32> {
    std::fs::File::open(p).err().and_then(|e| e.raw_os_error())
}

fn mkfifo(p: &Path) {
    sh(&format!("mkfifo {}", p.display()));
}

// ---------------------------------------------------------------------------------------
// 1. One mount per store.

#[test]
fn a_second_mount_of_a_store_is_refused_and_names_the_first() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/x", "--size", "16M", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    let other = e.path("other");
    std::fs::create_dir_all(&other).unwrap();
    for extra in [&[][..], &["--foreground"][..]] {
        let mut args = vec!["mount", other.to_str().unwrap()];
        args.extend_from_slice(extra);
        let err = e.fail_within(&args, 7, 20);
        assert!(
            err.contains(m.mnt.to_str().unwrap()) && err.contains("already mounted"),
            "{err}"
        );
        assert!(!is_mounted(&other), "a second mount went live");
    }
    // Removing the note of the live mount does not let a second one in, nor make it wait
    // as if the first were finishing.
    let _ = std::fs::remove_file(e.store.join("locks/store.mount"));
    let err = e.fail_within(&["mount", other.to_str().unwrap()], 7, 20);
    assert!(err.contains("one mount at a time"), "{err}");
    assert!(!is_mounted(&other));
    // The first mount still serves, and fsync'd writes through it stay.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/x"))
        .unwrap();
    f.write_all_at(b"first mount", 4096).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    // Once it is gone, the store mounts elsewhere, and the write is there.
    let mut args = vec!["mount", other.to_str().unwrap()];
    args.push("--read-only");
    e.ok(&args);
    let mut b = [0u8; 11];
    let f = std::fs::File::open(other.join("disks/x")).unwrap();
    f.read_exact_at(&mut b, 4096).unwrap();
    drop(f);
    e.ok(&["umount", other.to_str().unwrap()]);
    assert_eq!(&b, b"first mount");
}

/// `umount` returns before the daemon has let the store go: a mount right after it waits for
/// that daemon rather than being refused as "already mounted" at a place nothing is mounted.
#[test]
fn a_mount_right_after_a_kernel_umount_waits_for_the_old_daemon() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/x", "--size", "16M", "--encrypt"]);
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    for round in 0..5u8 {
        e.ok(&["mount", mnt.to_str().unwrap()]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("disks/x"))
            .unwrap();
        if round > 0 {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 4096).unwrap();
            assert_eq!(b[0], round - 1, "the last mount's fsync'd write");
        }
        f.write_all_at(&[round], 4096).unwrap();
        f.sync_all().unwrap();
        drop(f);
        sh(&format!("umount {}", mnt.display()));
    }
    assert!(!is_mounted(&mnt));
}

/// A mount whose daemon is stopped (`kill -STOP`) answers nothing, so any stat of it waits
/// for ever. `encimg mount` there and `encimg umount` of it do not stat it: the first is
/// refused at once, the second unmounts (and says the daemon is stopped); once continued,
/// the daemon finishes, the store mounts again and the fsync'd bytes are there.
#[test]
fn a_stopped_daemon_hangs_neither_mount_nor_umount() {
    if !can_mount() {
        return;
    }
    /// Continue the daemon whatever happens, so no test leaves a stopped process.
    struct Cont(String);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0]).status();
        }
    }
    let e = Env::new();
    e.ok(&["create", "disks/x", "--size", "16M", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/x"))
        .unwrap();
    f.write_all_at(b"kept", 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let cont = Cont(m.daemon_pid());
    sh(&format!("kill -STOP {}", cont.0));
    let mnt = m.mnt.to_str().unwrap().to_string();
    let err = e.fail_within(&["mount", &mnt], 7, 20);
    assert!(err.contains("already an encimg mount"), "{err}");
    let out = e.run_within(&["umount", &mnt], 20);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is stopped"),
        "{out:?}"
    );
    assert!(!is_mounted(&m.mnt));
    m.umount();
    // Continued, the old daemon finishes; the new mount waits for it to let the store go.
    drop(cont);
    let m = Mounted::new(&e, &[]);
    let mut b = [0u8; 4];
    std::fs::File::open(m.p("disks/x"))
        .unwrap()
        .read_exact_at(&mut b, 8192)
        .unwrap();
    assert_eq!(&b, b"kept");
    m.umount();
}

/// A mountpoint whose name is not UTF-8 (and has a space): mounted, used and unmounted like
/// any other (mountinfo was read as UTF-8 text, and failed).
#[test]
fn a_mountpoint_named_in_bytes_that_are_not_utf8_works() {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/x", "--size", "16M", "--encrypt"]);
    let mut name = e.path("m").into_os_string().into_vec();
    name.extend_from_slice(b"\xff \xfe");
    let mnt = PathBuf::from(std::ffi::OsStr::from_bytes(&name));
    std::fs::create_dir_all(&mnt).unwrap();
    let run = |verb: &str| {
        let o = e.cmd().arg(verb).arg(&mnt).output().unwrap();
        assert!(o.status.success(), "{verb}: {o:?}");
    };
    run("mount");
    let again = e.cmd().arg("mount").arg(&mnt).output().unwrap();
    assert_eq!(again.status.code(), Some(7), "{again:?}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disks/x"))
        .unwrap()
        .write_all_at(b"odd", 0)
        .unwrap();
    run("umount");
    assert!(!is_mounted(&mnt));
    run("mount");
    let mut b = [0u8; 3];
    std::fs::File::open(mnt.join("disks/x"))
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert_eq!(&b, b"odd");
    run("umount");
}

#[test]
fn two_mounts_started_at_once_end_with_one() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    let dirs: Vec<PathBuf> = (0..2).map(|i| e.path(&format!("m{i}"))).collect();
    let children: Vec<_> = dirs
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d).unwrap();
            e.cmd()
                .args(["mount", d.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<Option<i32>> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code())
        .collect();
    let live: Vec<&PathBuf> = dirs.iter().filter(|d| is_mounted(d)).collect();
    for d in &live {
        e.ok(&["umount", d.to_str().unwrap()]);
    }
    assert_eq!(live.len(), 1, "exit codes {codes:?}");
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![Some(0), Some(7)], "{codes:?}");
}

// ---------------------------------------------------------------------------------------
// 2. Key state follows the header on disk.

#[test]
fn a_rewrap_from_the_cli_under_an_open_file_moves_the_key_check() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.key("ka", "AES_256");
    e.key("kb", "AES_256");
    e.ok(&["create", "disks/f", "--size", "8M", "--key", "alias/ka"]);
    let m = Mounted::new(&e, &[]);
    let held = std::fs::File::open(m.p("disks/f")).unwrap();
    let mut b = [0u8; 512];
    held.read_exact_at(&mut b, 0).unwrap();
    e.ok(&["rekey", "disks/f", "--key", "alias/kb"]);
    // The old key no longer guards the disk: disabling it changes nothing.
    e.ok(&["key", "disable", "alias/ka"]);
    assert_eq!(
        open_errno(&m.p("disks/f")),
        None,
        "refused under the old key"
    );
    // The new key does.
    e.ok(&["key", "disable", "alias/kb"]);
    assert_eq!(open_errno(&m.p("disks/f")), Some(libc::EACCES));
    // Handles already open keep working, as documented.
    held.read_exact_at(&mut b, 0).unwrap();
    e.ok(&["key", "enable", "alias/kb"]);
    assert_eq!(open_errno(&m.p("disks/f")), None);
    drop(held);
    let log = std::fs::read_to_string(e.store.join("mount.log")).unwrap();
    assert!(log.contains("is Disabled"), "refusal not logged: {log}");
    m.umount();
}

// ---------------------------------------------------------------------------------------
// 3. Keys out of memory, no core dumps, no passphrase in the environment.

/// Where in `pid`'s memory each needle occurs: (mapping start, needle index).
fn find_in_memory(pid: &str, needles: &[&[u8]]) -> Vec<(u64, usize)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut hits = Vec::new();
    // Needles are 16 bytes; find candidates by their first 8 (sorted, binary-searched).
    let mut prefixes: Vec<(u64, usize)> = needles
        .iter()
        .enumerate()
        .map(|(i, nd)| {
            assert_eq!(nd.len(), 16);
            (u64::from_ne_bytes(nd[..8].try_into().unwrap()), i)
        })
        .collect();
    prefixes.sort_unstable();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let perms = f.next().unwrap();
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut at = a;
        let mut buf = vec![0u8; 1 << 20];
        while at < b {
            let n = ((b - at) as usize).min(buf.len());
            let Ok(got) = mem.read_at(&mut buf[..n], at) else {
                break;
            };
            if got == 0 {
                break;
            }
            for w in buf[..got].windows(16) {
                let p = u64::from_ne_bytes(w[..8].try_into().unwrap());
                if let Ok(at) = prefixes.binary_search_by_key(&p, |e| e.0) {
                    // Equal prefixes sit together around `at`.
                    let lo = prefixes[..at]
                        .iter()
                        .rposition(|e| e.0 != p)
                        .map_or(0, |x| x + 1);
                    for &(q, i) in prefixes[lo..].iter().take_while(|e| e.0 == p) {
                        let _ = q;
                        if w == needles[i] && !hits.contains(&(a, i)) {
                            hits.push((a, i));
                        }
                    }
                }
            }
            // Overlap so a needle across the chunk boundary is seen.
            at += got.saturating_sub(64).max(1) as u64;
        }
    }
    hits
}

/// The `VmFlags` of the mapping of `pid` that starts at `start`.
fn vm_flags(pid: &str, start: u64) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let header = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        if let Some((a, _)) = header {
            inside = a == start;
        } else if inside {
            if let Some(f) = line.strip_prefix("VmFlags:") {
                return f.trim().to_string();
            }
        }
    }
    String::new()
}

/// The GB/T 32907-2016 S-box, for the SM4 key schedule below.
#[rustfmt::skip]
const SM4_SBOX: [u8; 256] = [
    0xd6, 0x90, 0xe9, 0xfe, 0xcc, 0xe1, 0x3d, 0xb7, 0x16, 0xb6, 0x14, 0xc2, 0x28, 0xfb, 0x2c, 0x05,
    0x2b, 0x67, 0x9a, 0x76, 0x2a, 0xbe, 0x04, 0xc3, 0xaa, 0x44, 0x13, 0x26, 0x49, 0x86, 0x06, 0x99,
    0x9c, 0x42, 0x50, 0xf4, 0x91, 0xef, 0x98, 0x7a, 0x33, 0x54, 0x0b, 0x43, 0xed, 0xcf, 0xac, 0x62,
    0xe4, 0xb3, 0x1c, 0xa9, 0xc9, 0x08, 0xe8, 0x95, 0x80, 0xdf, 0x94, 0xfa, 0x75, 0x8f, 0x3f, 0xa6,
    0x47, 0x07, 0xa7, 0xfc, 0xf3, 0x73, 0x17, 0xba, 0x83, 0x59, 0x3c, 0x19, 0xe6, 0x85, 0x4f, 0xa8,
    0x68, 0x6b, 0x81, 0xb2, 0x71, 0x64, 0xda, 0x8b, 0xf8, 0xeb, 0x0f, 0x4b, 0x70, 0x56, 0x9d, 0x35,
    0x1e, 0x24, 0x0e, 0x5e, 0x63, 0x58, 0xd1, 0xa2, 0x25, 0x22, 0x7c, 0x3b, 0x01, 0x21, 0x78, 0x87,
    0xd4, 0x00, 0x46, 0x57, 0x9f, 0xd3, 0x27, 0x52, 0x4c, 0x36, 0x02, 0xe7, 0xa0, 0xc4, 0xc8, 0x9e,
    0xea, 0xbf, 0x8a, 0xd2, 0x40, 0xc7, 0x38, 0xb5, 0xa3, 0xf7, 0xf2, 0xce, 0xf9, 0x61, 0x15, 0xa1,
    0xe0, 0xae, 0x5d, 0xa4, 0x9b, 0x34, 0x1a, 0x55, 0xad, 0x93, 0x32, 0x30, 0xf5, 0x8c, 0xb1, 0xe3,
    0x1d, 0xf6, 0xe2, 0x2e, 0x82, 0x66, 0xca, 0x60, 0xc0, 0x29, 0x23, 0xab, 0x0d, 0x53, 0x4e, 0x6f,
    0xd5, 0xdb, 0x37, 0x45, 0xde, 0xfd, 0x8e, 0x2f, 0x03, 0xff, 0x6a, 0x72, 0x6d, 0x6c, 0x5b, 0x51,
    0x8d, 0x1b, 0xaf, 0x92, 0xbb, 0xdd, 0xbc, 0x7f, 0x11, 0xd9, 0x5c, 0x41, 0x1f, 0x10, 0x5a, 0xd8,
    0x0a, 0xc1, 0x31, 0x88, 0xa5, 0xcd, 0x7b, 0xbd, 0x2d, 0x74, 0xd0, 0x12, 0xb8, 0xe5, 0xb4, 0xb0,
    0x89, 0x69, 0x97, 0x4a, 0x0c, 0x96, 0x77, 0x7e, 0x65, 0xb9, 0xf1, 0x09, 0xc5, 0x6e, 0xc6, 0x84,
    0x18, 0xf0, 0x7d, 0xec, 0x3a, 0xdc, 0x4d, 0x20, 0x79, 0xee, 0x5f, 0x3e, 0xd7, 0xcb, 0x39, 0x48,
];

/// SM4's encryption round keys for `key` (GB/T 32907 key expansion), as they lie in memory
/// (32 native-endian words): the schedule an SM4 data key becomes, which gives the key back.
fn sm4_round_keys(key: &[u8]) -> Vec<u8> {
    const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];
    let mut k = [0u32; 4];
    for (i, w) in k.iter_mut().enumerate() {
        *w = u32::from_be_bytes(key[4 * i..4 * i + 4].try_into().unwrap()) ^ FK[i];
    }
    let mut out = Vec::new();
    for i in 0..32 {
        let ck = (0..4).fold(0u32, |w, j| (w << 8) | (((4 * i + j) * 7) & 0xff) as u32);
        let x = k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck;
        let b = u32::from_be_bytes(x.to_be_bytes().map(|c| SM4_SBOX[c as usize]));
        k[i % 4] ^= b ^ b.rotate_left(13) ^ b.rotate_left(23);
        out.extend_from_slice(&k[i % 4].to_ne_bytes());
    }
    out
}

#[test]
fn data_keys_leave_the_daemon_when_the_disk_closes_and_never_reach_a_core() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.key("sm", "SM4");
    e.ok(&["create", "disks/aes", "--size", "8M", "--encrypt"]);
    e.ok(&["create", "disks/sm4", "--size", "8M", "--key", "alias/sm"]);
    let dek_aes = e.dek("disks/aes");
    let dek_sm4 = e.dek("disks/sm4");
    assert_eq!(dek_aes.len(), 64);
    // The raw key halves (AES schedules begin with them), and the SM4 halves' round keys.
    let sm4_schedules: Vec<Vec<u8>> = dek_sm4.chunks(16).map(sm4_round_keys).collect();
    let pieces: Vec<&[u8]> = dek_aes
        .chunks(16)
        .chain(dek_sm4.chunks(16))
        .chain(sm4_schedules.iter().flat_map(|s| s.chunks(16)))
        .collect();
    let m = Mounted::new(&e, &[]);
    let pid = m.daemon_pid();
    {
        let fa = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p("disks/aes"))
            .unwrap();
        let fs = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p("disks/sm4"))
            .unwrap();
        // Writes and reads of every size class: sector-cache sized, direct, unaligned.
        let mut back = vec![0u8; 1 << 20];
        for f in [&fa, &fs] {
            for (len, off) in [
                (512usize, 0u64),
                (4096, 8192),
                (65536, 1 << 20),
                (1 << 20, 2 << 20),
                (700, 4097),
            ] {
                f.write_all_at(&pattern(len, 3), off).unwrap();
                f.read_exact_at(&mut back[..len], off).unwrap();
            }
            f.sync_all().unwrap();
        }
        // While open, the AES key schedules (which begin with the raw key halves) are in the
        // daemon: the scan finds them, and only in pages kept out of core dumps.
        let hits = find_in_memory(&pid, &pieces);
        assert!(
            hits.iter().any(|&(_, i)| i < 4) && hits.iter().any(|&(_, i)| i >= 8),
            "the scan does not see the open disks' key schedules: it would prove nothing"
        );
        for (start, _) in &hits {
            let flags = vm_flags(&pid, *start);
            assert!(
                flags.split(' ').any(|f| f == "dd"),
                "key material in a dumpable mapping at {start:#x} ({flags})"
            );
        }
    }
    // Close both, then delete them: every copy of the data keys must be gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in ["disks/aes", "disks/sm4"] {
        while !e.run(&["delete", d]).status.success() {
            assert!(Instant::now() < deadline, "{d} still open after close");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let hits = find_in_memory(&pid, &pieces);
    assert!(
        hits.is_empty(),
        "data key bytes still in the daemon after close and delete: {hits:x?}"
    );
    m.umount();
}

#[test]
fn the_daemon_leaves_no_core_when_it_crashes() {
    if !can_mount() {
        return;
    }
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    if pattern.trim() != "core" && pattern.trim() != "core.%p" {
        eprintln!("SKIPPED: core_pattern is {pattern:?}; this test reads plain core files");
        return;
    }
    let e = Env::new();
    // Control: on this machine a dumpable process that crashes leaves a core.
    let ctl = e.path("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    sh(&format!(
        "cd {} && ulimit -c unlimited && (sleep 30 & kill -ABRT $!; wait) ; true",
        ctl.display()
    ));
    // Core files in a directory, with their modification times (a new core may overwrite
    // an old one of the same name).
    let cores = |d: &Path| -> Vec<(PathBuf, std::time::SystemTime)> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n == "core" || n.starts_with("core."))
                    })
                    .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    if cores(&ctl).is_empty() {
        eprintln!("SKIPPED: this machine writes no core for a crashing process");
        return;
    }
    e.ok(&["create", "disks/x", "--size", "8M", "--encrypt"]);
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let before = cores(Path::new("/"));
    let bin = env!("CARGO_BIN_EXE_encimg");
    sh(&format!(
        "ulimit -c unlimited && ENCIMG_STORE={} {bin} mount {}",
        e.store.display(),
        mnt.display()
    ));
    let m = Mounted {
        env: &e,
        mnt: mnt.clone(),
        loops: Vec::new(),
    };
    std::fs::read(m.p("disks/x")).unwrap();
    let pid = m.daemon_pid();
    // SIGABRT: its default action dumps core (Rust's own SIGSEGV handler would let a
    // SIGSEGV sent by kill(2) be survived, and prove nothing).
    sh(&format!("kill -ABRT {pid}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let died = !Path::new(&format!("/proc/{pid}")).exists();
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&mnt)
        .status();
    let new: Vec<PathBuf> = cores(Path::new("/"))
        .into_iter()
        .filter(|c| !before.contains(c))
        .map(|c| c.0)
        .collect();
    for p in &new {
        let _ = std::fs::remove_file(p);
    }
    assert!(
        died,
        "SIGABRT did not end the daemon: the test proves nothing"
    );
    assert!(new.is_empty(), "the daemon dumped core: {new:?}");
}

#[test]
fn the_passphrase_leaves_the_environment_and_can_come_from_a_file() {
    let e = Env::bare();
    let pass = "correct horse battery staple 4711";
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE", pass)
        .args(["init"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Without it: exit 6, and the message says how to give it.
    let err = e.fail(&["key", "list"], 6);
    assert!(err.contains("--passphrase-file"), "{err}");
    // From a file, by flag or by variable; a wrong one is refused.
    let pf = e.path("pass");
    std::fs::write(&pf, format!("{pass}\n")).unwrap();
    e.ok(&["key", "list", "--passphrase-file", pf.to_str().unwrap()]);
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE_FILE", &pf)
        .args(["key", "create", "--alias", "a"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&pf, "wrong\n").unwrap();
    let err = e.fail(
        &["key", "list", "--passphrase-file", pf.to_str().unwrap()],
        6,
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    // A descriptor works too (here: stdin's, through /dev/fd/0).
    let o = e
        .cmd()
        .args(["key", "list", "--passphrase-file", "/dev/fd/0"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(pass.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    if !can_mount() {
        return;
    }
    // The mount daemon lives long: its environment must not show the passphrase.
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE", pass)
        .args(["mount", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Mounted {
        env: &e,
        mnt,
        loops: Vec::new(),
    };
    let pid = m.daemon_pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !environ.windows(pass.len()).any(|w| w == pass.as_bytes()),
        "the passphrase is in /proc/{pid}/environ"
    );
    assert!(
        !String::from_utf8_lossy(&environ).contains("ENCIMG_PASSPHRASE="),
        "the variable is still set"
    );
    // And the mount still unwraps keys (it kept the passphrase, not the variable).
    drop(m);
    let mnt = e.path("mnt");
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE", pass)
        .args(["create", "disks/d", "--size", "4M", "--key", "alias/a"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE", pass)
        .args(["mount", mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Mounted {
        env: &e,
        mnt,
        loops: Vec::new(),
    };
    assert_eq!(std::fs::read(m.p("disks/d")).unwrap().len(), 4 << 20);
    m.umount();
}

// ---------------------------------------------------------------------------------------
// 4. FIFOs and links in the store.

#[test]
fn fifos_and_symlinks_in_the_store_are_damage_not_hangs_or_followed_links() {
    let e = Env::new();
    let src = e.path("ok.raw");
    let data = write_pattern(&src, 1 << 20, 5);
    e.ok(&["import", src.to_str().unwrap(), "images/ok", "--encrypt"]);
    mkfifo(&e.store.join("images/x.eimg"));
    let secret = e.path("secret");
    std::fs::write(&secret, "root:$6$secret-hash:19000:0:99999:7:::\n").unwrap();
    std::os::unix::fs::symlink(&secret, e.store.join("images/s.raw")).unwrap();
    std::os::unix::fs::symlink(&secret, e.store.join("disks/t.eimg")).unwrap();

    for res in ["images/x", "images/s", "disks/t"] {
        let err = e.fail_within(&["info", res], 8, 10);
        assert!(err.contains("damaged"), "{err}");
        e.fail_within(&["dek", res, "--reveal"], 8, 10);
        e.fail_within(&["copy", res, "images/copied"], 8, 10);
    }
    let out = e.path("out.raw");
    e.fail_within(&["export", "images/s", out.to_str().unwrap()], 8, 10);
    assert!(!out.exists(), "export followed the link");
    assert!(!e.store.join("images/copied.raw").exists());
    let list = e.run_within(&["list", "--json"], 10);
    assert!(list.status.success());
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let damaged: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["damaged"].is_null())
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(damaged, ["images/s", "images/x", "disks/t"]);
    let human = String::from_utf8(e.run_within(&["list"], 10).stdout).unwrap();
    assert!(
        human.contains("images/ok") && human.contains("DAMAGED"),
        "{human}"
    );
    let sk = e.info("images/ok")["key_id"].as_str().unwrap().to_string();
    let usage = e.run_within(&["key", "usage", &sk, "--json"], 10);
    assert!(usage.status.success());
    let u: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(u["resources"], serde_json::json!(["images/ok"]));
    // The FIFO and the link named .eimg may hide a resource under the key: deleting the key
    // is refused until they are dealt with.
    assert_eq!(u["unreadable"], serde_json::json!(["images/x", "disks/t"]));
    // Delete removes the entry itself, never what a link points to.
    e.ok(&["delete", "images/s"]);
    assert!(secret.exists(), "delete followed the link");

    if !can_mount() {
        return;
    }
    let m = Mounted::new(&e, &[]);
    let o = Command::new("timeout")
        .args(["10", "ls", "-l"])
        .arg(m.p("images"))
        .arg(m.p("disks"))
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(124), "ls hung on a FIFO in the store");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(" ok"), "{text}");
    for p in ["images/x", "disks/t"] {
        let o = Command::new("timeout")
            .args(["10", "cat"])
            .arg(m.p(p))
            .output()
            .unwrap();
        assert_ne!(o.status.code(), Some(124), "reading {p} hung");
        assert!(!o.status.success(), "{p} read through the mount");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("secret-hash"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("Input/output error"), "{p}: {err}");
    }
    // The rest of the store is unaffected.
    assert!(std::fs::read(m.p("images/ok")).unwrap() == data);
    m.umount();
}

// ---------------------------------------------------------------------------------------
// 5. Damage stays local and loud.

#[test]
fn truncated_payloads_wrong_kinds_and_dead_headers_are_damage_that_stays_local() {
    let e = Env::new();
    let src = e.path("a.raw");
    let data = write_pattern(&src, 3 << 20, 6);
    for r in ["images/ok", "images/cut", "images/dead"] {
        e.ok(&["import", src.to_str().unwrap(), r, "--encrypt"]);
    }
    e.key("kx", "AES_256");
    e.ok(&[
        "import",
        src.to_str().unwrap(),
        "disks/moved",
        "--key",
        "alias/kx",
    ]);
    // A payload cut below its header's size (sparse files keep their length).
    let cut = e.store.join("images/cut.eimg");
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(f.metadata().unwrap().len() - (1 << 20)).unwrap();
    drop(f);
    // Both header copies damaged.
    let dead = e.store.join("images/dead.eimg");
    let f = std::fs::OpenOptions::new().write(true).open(&dead).unwrap();
    f.write_all_at(&[0xff; 16], 24).unwrap();
    f.write_all_at(&[0xff; 16], 4096 + 24).unwrap();
    drop(f);
    // A disk's file moved under images/.
    std::fs::rename(
        e.store.join("disks/moved.eimg"),
        e.store.join("images/moved.eimg"),
    )
    .unwrap();

    let err = e.fail(&["info", "images/cut"], 8);
    assert!(
        err.contains("truncated") && err.contains("images/cut"),
        "{err}"
    );
    e.fail(&["copy", "images/cut", "images/cut2"], 8);
    e.fail(&["create", "disks/fromcut", "--from", "images/cut"], 8);
    let err = e.fail(&["info", "images/dead"], 8);
    assert!(err.contains("header"), "{err}");
    let err = e.fail(&["info", "images/moved"], 8);
    assert!(err.contains("disk") && err.contains("images/"), "{err}");
    assert!(!e.store.join("images/cut2.eimg").exists());
    // Damage does not hide a resource from its key: deleting the key stays refused.
    let u = e.json(&["key", "usage", "alias/kx", "--json"]);
    assert_eq!(u["resources"], serde_json::json!(["images/moved"]), "{u}");
    let err = e.fail(&["key", "schedule-deletion", "alias/kx", "--days", "7"], 5);
    assert!(err.contains("images/moved"), "{err}");
    let kx_dead = e.key("kdead", "AES_256");
    let err = e.fail(&["key", "schedule-deletion", &kx_dead, "--days", "7"], 5);
    assert!(err.contains("images/dead"), "{err}");

    let v = e.json(&["list", "--json"]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v}");
    for r in rows {
        let ok = r["path"] == "images/ok";
        assert_eq!(r["damaged"].is_null(), ok, "{r}");
        if ok {
            assert_eq!(r["size"], data.len() as u64);
        }
    }

    if !can_mount() {
        return;
    }
    let m = Mounted::new(&e, &[]);
    for p in ["images/cut", "images/dead", "images/moved"] {
        let err = std::fs::read(m.p(p)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{p}");
    }
    assert!(std::fs::read(m.p("images/ok")).unwrap() == data);
    // Truncated while open: what is there reads, what is gone is EIO, never zeros. (Read
    // with O_DIRECT: the pages of the whole read above may still be in the kernel's cache,
    // and they hold the right plaintext; this asks the daemon.)
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("images/ok"))
        .unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    let ok = e.store.join("images/ok.eimg");
    let len = std::fs::metadata(&ok).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ok)
        .unwrap()
        .set_len(len - (1 << 20))
        .unwrap();
    let mut tail = vec![0u8; 4096];
    let err = f
        .read_exact_at(&mut tail, data.len() as u64 - 4096)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);
    m.umount();
}

// ---------------------------------------------------------------------------------------
// 6 and 7. Out of space, files too large, odd inputs; leftovers.

/// A small ext4 filesystem, loop-mounted; unmounted when dropped.
struct SmallFs {
    dir: PathBuf,
    /// The directory of the image and mountpoint, when this owns it (removed after the
    /// unmount: fields drop after `drop`).
    _home: Option<Env>,
}

impl SmallFs {
    fn new(e: &Env, size: &str) -> Option<SmallFs> {
        if !is_root() || !have("mkfs.ext4") || !have("losetup") {
            eprintln!("SKIPPED: needs root, mkfs.ext4 and loop devices");
            return None;
        }
        let img = e.path("small.img");
        let dir = e.path("small");
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!(
            "truncate -s {size} {0} && mkfs.ext4 -q -F -m 0 {0} && mount -o loop {0} {1}",
            img.display(),
            dir.display()
        ));
        Some(SmallFs { dir, _home: None })
    }

    /// A small filesystem with an initialized store on it, and the `Env` of that store.
    fn with_store(size: &str) -> Option<(SmallFs, Env)> {
        let home = Env::bare();
        let mut small = SmallFs::new(&home, size)?;
        small._home = Some(home);
        let e = Env {
            dir: tempfile::tempdir().unwrap(),
            store: small.dir.join("store"),
            vars: Vec::new(),
        };
        e.ok(&["init"]);
        Some((small, e))
    }

    /// Fill what is left of the filesystem.
    fn fill(&self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if=/dev/zero of={0}/fill bs=64k 2>/dev/null; dd if=/dev/zero of={0}/fill2 bs=1k 2>/dev/null; true",
                self.dir.display()
            ))
            .status();
    }

    fn unfill(&self) {
        let _ = std::fs::remove_file(self.dir.join("fill"));
        let _ = std::fs::remove_file(self.dir.join("fill2"));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Files under `dir` (recursively) whose names say they are temporary.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = ent.path();
        let name = ent.file_name().to_string_lossy().to_string();
        if p.is_dir() && !p.is_symlink() {
            out.extend(temporaries(&p));
        } else if name.contains(".tmp.") || name.ends_with(".partial") {
            out.push(p);
        }
    }
    out
}

#[test]
fn odd_inputs_are_refused_with_the_right_exit_code() {
    let e = Env::new();
    let dir = e.path("adir");
    std::fs::create_dir_all(&dir).unwrap();
    let err = e.fail(&["import", dir.to_str().unwrap(), "images/d"], 2);
    assert!(err.contains("is a directory"), "{err}");
    let err = e.fail(&["import", "/dev/null", "images/n"], 2);
    assert!(err.contains("character device"), "{err}");
    let fifo = e.path("fifo");
    mkfifo(&fifo);
    let err = e.fail_within(&["import", fifo.to_str().unwrap(), "images/f"], 2, 10);
    assert!(err.contains("FIFO"), "{err}");
    let empty = e.path("empty");
    std::fs::write(&empty, b"").unwrap();
    let err = e.fail(
        &["import", empty.to_str().unwrap(), "images/e", "--encrypt"],
        2,
    );
    assert!(err.contains("empty"), "{err}");
    e.fail(&["create", "disks/z", "--size", "0"], 2);
    assert!(temporaries(&e.store).is_empty());
    assert!(e.json(&["list", "--json"]).as_array().unwrap().is_empty());
}

#[test]
fn a_full_or_too_small_filesystem_gives_exit_9_naming_the_operation_and_leaves_nothing() {
    let Some((small, e)) = SmallFs::with_store("48M") else {
        return;
    };
    let src = e.path("big.raw");
    let data = write_pattern(&src, 64 << 20, 9);
    // Disk full, encrypted and not.
    for extra in [&["--encrypt"][..], &[][..]] {
        let mut args = vec!["import", src.to_str().unwrap(), "images/big"];
        args.extend_from_slice(extra);
        let err = e.fail(&args, 9);
        assert!(
            err.contains("import")
                && err.contains("No space left on device")
                && err.contains(e.store.join("tmp").to_str().unwrap()),
            "{err}"
        );
        assert!(
            temporaries(&e.store).is_empty(),
            "{:?}",
            temporaries(&e.store)
        );
    }
    // A file larger than the filesystem can hold (ext4: 16 TiB with 4 KiB blocks).
    let err = e.fail(&["create", "disks/huge", "--size", "16T", "--encrypt"], 9);
    assert!(
        err.contains("create disks/huge") && err.contains("too large"),
        "{err}"
    );
    assert!(temporaries(&e.store).is_empty());
    // The store works once space is there.
    std::fs::write(&src, &data[..8 << 20]).unwrap();
    e.ok(&["import", src.to_str().unwrap(), "images/small", "--encrypt"]);
    assert!(read_plain(&e.store, "images/small") == data[..8 << 20]);

    // A key-store write on a full disk: refused, no temporary file left, nothing lost.
    small.fill();
    let err = e.fail(&["key", "create", "--alias", "full"], 9);
    assert!(err.contains("No space left"), "{err}");
    assert!(
        temporaries(&e.store).is_empty(),
        "{:?}",
        temporaries(&e.store)
    );
    small.unfill();
    e.ok(&["key", "create", "--alias", "full"]);
    assert!(read_plain(&e.store, "images/small") == data[..8 << 20]);

    if !can_mount() {
        return;
    }
    // A control-file request on a full disk: ENOSPC, and `jobs` still says why.
    let m = Mounted::new(&e, &[]);
    small.fill();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p(".control/copy"))
        .unwrap();
    let err = f
        .write_all_at(b"images/small images/copy\n", 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    drop(f);
    let jobs = std::fs::read_to_string(m.p(".control/jobs")).unwrap();
    let last = jobs.lines().last().unwrap_or_default();
    assert!(
        last.contains("rejected") && last.contains("No space left"),
        "{jobs}"
    );
    assert!(
        temporaries(&e.store).is_empty(),
        "{:?}",
        temporaries(&e.store)
    );
    small.unfill();
    m.umount();
    // Temporary files of writers that died are swept at the next mount.
    let stale = e.store.join("jobs/.job-0.json.tmp.4194303.abcdef");
    std::fs::write(&stale, b"").unwrap();
    let m = Mounted::new(&e, &[]);
    assert!(
        !stale.exists(),
        "a dead writer's temporary file survived a remount"
    );
    m.umount();
}

/// Whether some process holds a `flock` on `path` (as `/proc/locks` shows).
fn flocked(path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let ino = format!(":{} ", m.ino());
    locks
        .lines()
        .any(|l| l.contains("FLOCK") && format!("{l} ").contains(&ino))
}

#[test]
fn a_source_being_copied_cannot_be_deleted_under_the_copy() {
    let e = Env::new();
    let src = e.path("a.raw");
    // Random bytes, so nothing is skipped as a hole and the copy takes a while.
    sh(&format!(
        "head -c 256M /dev/urandom > {} 2>/dev/null",
        src.display()
    ));
    e.ok(&["import", src.to_str().unwrap(), "images/src"]);
    let run = |mounted: Option<&Mounted>| {
        let mut copier = match mounted {
            Some(m) => {
                control_write(m, "copy", "images/src images/dst encrypt\n");
                None
            }
            None => Some(
                e.cmd()
                    .args(["copy", "images/src", "images/dst", "--encrypt"])
                    .spawn()
                    .unwrap(),
            ),
        };
        let mut running = || match (&mut copier, mounted) {
            (Some(c), _) => c.try_wait().unwrap().is_none(),
            (None, Some(m)) => {
                let j = std::fs::read_to_string(m.p(".control/jobs")).unwrap();
                j.lines().last().unwrap_or("").contains(" running ")
            }
            _ => false,
        };
        // Start once the copy holds its source (its lock shows in /proc/locks).
        let lock = e.store.join("locks/images.src.open");
        while running() && !flocked(&lock) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut refused = 0;
        while running() {
            let o = e.run(&["delete", "images/src"]);
            let still = running();
            if o.status.success() {
                // Only legitimate once the copy has ended.
                assert!(!still, "the source was deleted while the copy read it");
                break;
            }
            assert_eq!(
                o.status.code(),
                Some(7),
                "delete of a source being copied: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            refused += 1;
        }
        if let Some(mut c) = copier {
            assert!(c.wait().unwrap().success());
        }
        assert!(refused > 0, "the copy ended before a delete was tried");
        if !e.store.join("images/src.raw").exists() {
            e.ok(&["import", src.to_str().unwrap(), "images/src"]);
        }
        e.ok(&["delete", "images/dst"]);
    };
    run(None);
    if can_mount() {
        let m = Mounted::new(&e, &[]);
        run(Some(&m));
        m.umount();
    }
}

// ---------------------------------------------------------------------------------------
// 8. Input and permissions.

#[test]
fn weak_or_blocking_key_material_is_refused() {
    let e = Env::new();
    let k = e
        .ok(&["key", "create", "--origin", "EXTERNAL", "--alias", "byok"])
        .trim()
        .to_string();
    let zeros = e.path("zeros");
    std::fs::write(&zeros, [0u8; 32]).unwrap();
    let err = e.fail(
        &["key", "import", &k, "--material", zeros.to_str().unwrap()],
        2,
    );
    assert!(err.contains("not a key"), "{err}");
    let fifo = e.path("fifo");
    mkfifo(&fifo);
    let err = e.fail_within(
        &["key", "import", &k, "--material", fifo.to_str().unwrap()],
        2,
        10,
    );
    assert!(err.contains("not a regular file"), "{err}");
    e.fail_within(&["key", "import", &k, "--material", "/dev/zero"], 2, 10);
    assert_eq!(
        e.json(&["key", "describe", &k, "--json"])["state"],
        "PendingImport"
    );
    let good = e.path("good");
    std::fs::write(&good, pattern(32, 77)).unwrap();
    e.ok(&["key", "import", &k, "--material", good.to_str().unwrap()]);
}

#[test]
fn loose_permissions_and_other_users_stores_get_the_truth() {
    let e = Env::new();
    // A root key others can read is refused, as ssh refuses such a private key.
    let rk = e.store.join("keys/root.key");
    std::fs::set_permissions(&rk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = e.fail(&["key", "create"], 5);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&rk, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A store directory others can enter works, with a warning.
    std::fs::set_permissions(&e.store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = e.run(&["key", "list"]);
    assert!(o.status.success());
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(
        warn.contains("warning") && warn.contains("chmod 700"),
        "{warn}"
    );
    std::fs::set_permissions(&e.store, std::fs::Permissions::from_mode(0o700)).unwrap();

    if !is_root() || !have("setpriv") {
        eprintln!("SKIPPED: the other-user half needs root and setpriv");
        return;
    }
    // Another user's view of this (root's, 0700) store: permission denied, not "no store".
    std::fs::set_permissions(e.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin = env!("CARGO_BIN_EXE_encimg");
    let (ok, err) = as_nobody(&format!("{bin} --store {} list", e.store.display()));
    assert!(!ok && err.contains("permission denied"), "{err}");
    assert!(!err.contains("no store"), "{err}");

    // Root working on a user's store keeps the files the user's.
    let ustore = e.path("ustore");
    std::fs::create_dir_all(&ustore).unwrap();
    sh(&format!("chown 65534:65534 {}", ustore.display()));
    let (ok, err) = as_nobody(&format!("{bin} --store {}/s init", ustore.display()));
    assert!(ok, "{err}");
    let us = ustore.join("s");
    let root_env = Env {
        dir: tempfile::tempdir().unwrap(),
        store: us.clone(),
        vars: Vec::new(),
    };
    root_env.ok(&["key", "create", "--alias", "by-root"]);
    let src = root_env.path("r.raw");
    write_pattern(&src, 1 << 20, 1);
    root_env.ok(&["import", src.to_str().unwrap(), "images/r", "--encrypt"]);
    for p in ["keys/keystore.json", "images/r.eimg", "keys/.lock"] {
        let m = std::fs::metadata(us.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p} changed owner");
    }
    let (ok, err) = as_nobody(&format!("{bin} --store {} key list", us.display()));
    assert!(ok, "the owner is locked out of their store: {err}");
    let (ok, err) = as_nobody(&format!(
        "{bin} --store {} info images/r > /dev/null",
        us.display()
    ));
    assert!(ok, "{err}");
}

// ---------------------------------------------------------------------------------------
// Found by review of the fixes above.

#[test]
fn the_mount_log_is_never_a_link_or_a_fifo() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    let victim = e.path("victim");
    std::fs::write(&victim, b"untouched\n").unwrap();
    std::os::unix::fs::symlink(&victim, e.store.join("mount.log")).unwrap();
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let o = e.run_within(&["mount", mnt.to_str().unwrap()], 20);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Mounted {
        env: &e,
        mnt: mnt.clone(),
        loops: Vec::new(),
    };
    m.umount();
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched\n");
    std::fs::remove_file(e.store.join("mount.log")).unwrap();
    mkfifo(&e.store.join("mount.log"));
    let o = e.run_within(&["mount", mnt.to_str().unwrap()], 20);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Mounted {
        env: &e,
        mnt,
        loops: Vec::new(),
    };
    m.umount();
}

#[test]
fn a_passphrase_fifo_never_hangs_a_command() {
    let e = Env::new();
    let fifo = e.path("pf");
    mkfifo(&fifo);
    let err = e.fail_within(
        &["--passphrase-file", fifo.to_str().unwrap(), "list"],
        2,
        20,
    );
    assert!(err.contains("empty"), "{err}");
    let o = e
        .cmd()
        .env("ENCIMG_PASSPHRASE_FILE", &fifo)
        .args(["list"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_key_store_lock_held_elsewhere_delays_only_what_needs_it() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/a", "--size", "4M", "--encrypt"]);
    e.ok(&["create", "disks/b", "--size", "4M", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    let held = std::fs::File::open(m.p("disks/a")).unwrap();
    // Another process (here: this test) holds the key-store lock and does not let go.
    let holder = std::fs::File::open(e.store.join("keys/.lock")).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this test owns.
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    }
    // A read on a file already open needs no key: it is not held up.
    let t = Instant::now();
    let mut b = [0u8; 512];
    held.read_exact_at(&mut b, 0).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // An open must check the key: it waits a bounded time, then answers busy.
    let t = Instant::now();
    let r = std::fs::File::open(m.p("disks/b"));
    let waited = t.elapsed();
    drop(holder);
    assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::EBUSY));
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    // Once the lock is free, opens work again.
    std::fs::File::open(m.p("disks/b")).unwrap();
    drop(held);
    m.umount();
}

#[test]
fn an_interrupted_export_leaves_no_plaintext_behind() {
    let e = Env::new();
    let src = e.path("a.raw");
    sh(&format!(
        "head -c 512M /dev/urandom > {} 2>/dev/null",
        src.display()
    ));
    e.ok(&["import", src.to_str().unwrap(), "images/p"]);
    std::fs::remove_file(&src).unwrap();
    let out_dir = e.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("p.raw");
    let mut c = e
        .cmd()
        .args(["export", "images/p", out.to_str().unwrap()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    sh(&format!("kill -9 {}", c.id()));
    let _ = c.wait();
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|x| x.path())
        .collect();
    assert!(
        left.is_empty() || left == [out.clone()],
        "an interrupted export left {left:?}"
    );
    // A whole export is private to its owner, and a bad destination fails before copying.
    let _ = std::fs::remove_file(&out);
    e.ok(&["export", "images/p", out.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
    let long = out_dir.join("x".repeat(300));
    e.fail(&["export", "images/p", long.to_str().unwrap()], 2);
    e.fail(
        &[
            "export",
            "images/p",
            out_dir.join("no/such").to_str().unwrap(),
        ],
        3,
    );
}

/// A snapshot of a disk being written, with no room left for the old data the snapshot
/// must keep (copy-before-write, see `store::freeze`): the job fails and says so, but no
/// write through the mount fails or is lost, nothing is left under `tmp/`, and the snapshot
/// works once there is room. Root, loop devices and /dev/fuse.
#[test]
fn a_snapshot_under_writes_without_room_for_the_old_data_fails_and_no_write_does() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Mutex;
    const SS: usize = 4096;
    const LEN: usize = 16 << 20;
    if !can_mount() {
        return;
    }
    let Some((small, e)) = SmallFs::with_store("48M") else {
        return;
    };
    e.ok(&["create", "disks/d", "--size", "16M", "--encrypt"]);
    let m = Mounted::new(&e, &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    f.write_all_at(&pattern(LEN, 4), 0).unwrap();
    f.sync_all().unwrap();
    // Leave 6 MiB: a snapshot needs 16 for itself and up to 16 more for what changes. The
    // writer touches every MiB at once, so the saves fill the disk and fail from the 7th on
    // (the writes go on regardless), then the snapshot itself has no room.
    // SAFETY: an all-zero statvfs is valid, and the path is NUL-terminated.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let p = std::ffi::CString::new(small.dir.to_str().unwrap()).unwrap();
        assert_eq!(libc::statvfs(p.as_ptr(), &mut st), 0);
        st.f_bavail * st.f_frsize
    };
    sh(&format!(
        "fallocate -l {} {}",
        free - (6 << 20),
        small.dir.join("fill").display()
    ));
    let sector = |k: u64| k.to_le_bytes().repeat(SS / 8);
    let swept: Vec<u64> = (0..LEN as u64).step_by(256 << 10).collect();
    let stop = AtomicBool::new(false);
    let last = Mutex::new(0u64);
    let job = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for k in 1.. {
                if stop.load(Relaxed) {
                    return;
                }
                for &at in &swept {
                    f.write_all_at(&sector(k), at)
                        .unwrap_or_else(|e| panic!("a write failed during the snapshot: {e}"));
                }
                *last.lock().unwrap() = k;
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        control_write(&m, "snapshot", "disks/d snapshots/s\n");
        let out = e.run(&["job", "wait", &last_job(&m)]);
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Relaxed);
        writer.join().unwrap();
        out
    });
    let said = String::from_utf8_lossy(&job.stdout).to_string();
    assert!(!job.status.success(), "the snapshot said done: {said}");
    assert!(said.contains("No space left on device"), "{said}");
    assert!(
        !e.run(&["info", "snapshots/s"]).status.success(),
        "a snapshot was made"
    );
    assert!(
        temporaries(&e.store).is_empty(),
        "{:?}",
        temporaries(&e.store)
    );
    // Every write is there, through the mount and in the store.
    let k = *last.lock().unwrap();
    let mut want = pattern(LEN, 4);
    for &at in &swept {
        want[at as usize..at as usize + SS].copy_from_slice(&sector(k));
    }
    let mut got = vec![0u8; LEN];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "a write was lost (through the mount)");
    drop(f);
    // Room again: the snapshot works, and holds the disk.
    std::fs::remove_file(small.dir.join("fill")).unwrap();
    control_write(&m, "snapshot", "disks/d snapshots/s\n");
    e.ok(&["job", "wait", &last_job(&m)]);
    m.umount();
    assert!(read_plain(&e.store, "disks/d") == want, "a write was lost");
    assert!(read_plain(&e.store, "snapshots/s") == want);
}

/// A daemon whose log cannot be written (its filesystem full: here, `/dev/full`) goes on
/// serving: what it would log is lost, nothing else. It used to abort at the first line it
/// logged (the logger reported its own failure with `eprintln!`, which panicked, and so did
/// the panic hook's). Root and /dev/fuse.
#[test]
fn a_daemon_that_cannot_write_its_log_goes_on_serving() {
    if !can_mount() {
        return;
    }
    let e = Env::new();
    let k = e.key("k", "AES_256");
    e.ok(&["create", "disks/d", "--size", "4M", "--key", &k]);
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut daemon = e
        .cmd()
        .args(["mount", "--foreground", mnt.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !is_mounted(&mnt) && t.elapsed() < Duration::from_secs(20) {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon died at start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each refused open logs a warning.
    e.ok(&["key", "disable", &k]);
    let refused: Vec<_> = (0..3)
        .map(|_| std::fs::File::open(mnt.join("disks/d")).map_err(|e| e.raw_os_error()))
        .map(|r| r.err().flatten())
        .collect();
    e.ok(&["key", "enable", &k]);
    let got = std::fs::read(mnt.join("disks/d"));
    let alive = daemon.try_wait().unwrap().is_none();
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&mnt)
        .status();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(alive, "the daemon died (opens answered {refused:?})");
    assert_eq!(refused, vec![Some(libc::EACCES); 3]);
    assert_eq!(got.unwrap().len(), 4 << 20);
}
