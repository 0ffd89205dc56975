//! The filesystem core without FUSE: the tree, a reference model of reads and writes across
//! sector boundaries and cache evictions, concurrent neighbouring writers, control-file
//! requests with their errnos, and live key states.

mod common;
use common::*;

use encimg::fs::{Fs, MountOptions, NodeKind, ROOT_INO};
use encimg::store::Store;
use proptest::prelude::*;

fn mount_opts(cache: u64) -> MountOptions {
    MountOptions {
        read_only: false,
        writable_images: false,
        cache_bytes: cache,
        allow_other: false,
        uid: 0,
        gid: 0,
        account_uid: None,
        object_cache_bytes: None,
    }
}

fn fs_for(e: &Env, cache: u64) -> Fs {
    Fs::new(Store::at(&e.store, "local"), mount_opts(cache)).unwrap()
}

fn ino(fs: &Fs, path: &str) -> u64 {
    let mut ino = ROOT_INO;
    for part in path.split('/') {
        ino = fs.lookup(ino, part).unwrap().ino;
    }
    ino
}

fn errno(r: encimg::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("expected an error").errno()
}

#[test]
fn tree_and_attributes() {
    let e = Env::new();
    let src = e.path("a.raw");
    write_pattern(&src, 100_000, 1);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["create", "disks/d", "--size", "1M", "--encrypt"]);
    let fs = fs_for(&e, 1 << 20);
    let names: Vec<String> = fs
        .readdir(ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, vec!["images", "disks", "snapshots", ".control"]);
    let a = fs.getattr(ino(&fs, "images/a")).unwrap();
    assert_eq!(a.size, 100_000);
    assert_eq!(a.kind, NodeKind::File);
    assert_eq!(a.perm, 0o400);
    assert_eq!(fs.getattr(ino(&fs, "disks/d")).unwrap().perm, 0o600);
    let ctl: Vec<String> = fs
        .readdir(ino(&fs, ".control"))
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(ctl, vec!["copy", "rekey", "snapshot", "cancel", "jobs"]);
    assert_eq!(errno(fs.lookup(ino(&fs, "images"), "nope")), libc::ENOENT);
    assert_eq!(errno(fs.lookup(ino(&fs, "images"), "../x")), libc::ENOENT);
    // Images and snapshots are read-only; disks are not.
    assert_eq!(errno(fs.open(ino(&fs, "images/a"), true)), libc::EROFS);
    let (fh, _) = fs.open(ino(&fs, "images/a"), false).unwrap();
    assert_eq!(fs.read(0, fh, 99_990, 100).unwrap().len(), 10);
    fs.release(0, fh).unwrap();
    // Resources made by the CLI while mounted appear; deleted ones disappear.
    e.ok(&["create", "disks/later", "--size", "1M"]);
    assert!(fs
        .readdir(ino(&fs, "disks"))
        .unwrap()
        .iter()
        .any(|d| d.name == "later"));
    e.ok(&["delete", "disks/later"]);
    assert!(!fs
        .readdir(ino(&fs, "disks"))
        .unwrap()
        .iter()
        .any(|d| d.name == "later"));
    // Open resources cannot be deleted.
    let (fh, _) = fs.open(ino(&fs, "disks/d"), true).unwrap();
    e.fail(&["delete", "disks/d"], 7);
    assert_eq!(errno(fs.write(0, fh, 1 << 20, b"x")), libc::ENOSPC);
    fs.release(0, fh).unwrap();
    e.ok(&["delete", "disks/d"]);
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..300_000, proptest::collection::vec(any::<u8>(), 1..9000)).prop_map(|(o, d)| Op::Write(o, d)),
        4 => (0u64..300_000, 1usize..20000).prop_map(|(o, l)| Op::Read(o, l)),
        // Large requests take the path around the cache.
        1 => (0u64..300_000, 131_072usize..200_000, any::<u8>()).prop_map(|(o, n, b)| Op::Write(o, vec![b; n])),
        1 => (0u64..300_000, 131_072usize..300_000).prop_map(|(o, l)| Op::Read(o, l)),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Random reads and writes across sector boundaries, with a cache small enough to
    /// evict, agree with a plain Vec<u8> after every step, and with a fresh open at the end.
    #[test]
    fn reference_model(ops in proptest::collection::vec(op(), 1..40), sector in prop_oneof![Just("512"), Just("4096")], cache in prop_oneof![Just(0u64), Just(32 * 1024), Just(1 << 20)]) {
        let e = Env::new();
        let size = 262_144 + 1000u64;
        e.ok(&["create", "disks/m", "--size", &size.to_string(), "--encrypt", "--sector-size", sector]);
        let fs = fs_for(&e, cache);
        let i = ino(&fs, "disks/m");
        let mut model = vec![0u8; size as usize];
        let (mut fh, _) = fs.open(i, true).unwrap();
        for op in ops {
            match op {
                Op::Write(o, d) => {
                    let r = fs.write(i, fh, o, &d);
                    if o >= size {
                        prop_assert_eq!(errno(r), libc::ENOSPC);
                    } else {
                        let n = r.unwrap() as usize;
                        prop_assert_eq!(n, d.len().min((size - o) as usize));
                        model[o as usize..o as usize + n].copy_from_slice(&d[..n]);
                    }
                }
                Op::Read(o, l) => {
                    let got = fs.read(i, fh, o, l as u32).unwrap();
                    let end = (o as usize + l).min(size as usize);
                    let want = if (o as usize) < end { &model[o as usize..end] } else { &[][..] };
                    prop_assert!(&got[..] == want, "read {} {} differs", o, l);
                }
                Op::Reopen => {
                    fs.release(i, fh).unwrap();
                    fh = fs.open(i, true).unwrap().0;
                }
            }
        }
        fs.release(i, fh).unwrap();
        fs.shutdown();
        prop_assert_eq!(fs.cache_bytes(), 0);
        prop_assert!(read_plain(&e.store, "disks/m") == model);
    }
}

#[test]
fn neighbouring_writers_never_lose_bytes() {
    let e = Env::new();
    e.ok(&[
        "create",
        "disks/n",
        "--size",
        "64K",
        "--encrypt",
        "--sector-size",
        "4096",
    ]);
    let fs = std::sync::Arc::new(fs_for(&e, 1 << 20));
    let i = ino(&fs, "disks/n");
    let (fh, _) = fs.open(i, true).unwrap();
    // 8 threads each own every 8th byte range of 100 bytes, all inside the same sectors.
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                for k in 0..80u64 {
                    let off = (k * 8 + u64::from(t)) * 100;
                    if off + 100 > 65536 {
                        break;
                    }
                    fs.write(i, fh, off, &[t + 1; 100]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    fs.release(i, fh).unwrap();
    let data = read_plain(&e.store, "disks/n");
    for k in 0..655u64 {
        let t = (k % 8) as u8;
        let off = (k * 100) as usize;
        if off + 100 > 65536 || k / 8 >= 80 {
            continue;
        }
        assert!(
            data[off..off + 100].iter().all(|&b| b == t + 1),
            "range {k} lost"
        );
    }
}

fn control(fs: &Fs, file: &str, line: &str) -> encimg::Result<u32> {
    let i = ino(fs, &format!(".control/{file}"));
    let (fh, direct) = fs.open(i, true)?;
    assert_eq!(direct, encimg::fs::Caching::Direct);
    let r = fs.write(i, fh, 0, line.as_bytes());
    fs.release(i, fh)?;
    r
}

fn jobs(fs: &Fs) -> Vec<String> {
    let i = ino(fs, ".control/jobs");
    let (fh, _) = fs.open(i, false).unwrap();
    let text = fs.read(i, fh, 0, 1 << 20).unwrap();
    fs.release(i, fh).unwrap();
    String::from_utf8(text.to_vec())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn wait_done(e: &Env, fs: &Fs, dst: &str) {
    let line = jobs(fs)
        .into_iter()
        .rev()
        .find(|l| l.split(' ').nth(3) == Some(dst))
        .expect("job line");
    let id = line.split(' ').next().unwrap().to_string();
    let out = e.ok(&["job", "wait", &id]);
    assert!(out.contains("done"), "{out}");
}

#[test]
fn control_files_run_jobs_and_answer_errnos() {
    let e = Env::new();
    let k = e.key("k", "AES_256");
    let sm4 = e.key("s", "SM4");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 3 << 20, 7);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["import", src.to_str().unwrap(), "images/p"]);
    e.ok(&["create", "disks/d", "--from", "images/a"]);
    let fs = fs_for(&e, 1 << 20);
    // Accepted requests run in the background; results appear in the tree.
    control(&fs, "copy", "images/a images/b key=alias/k\n").unwrap();
    wait_done(&e, &fs, "images/b");
    assert_eq!(e.info("images/b")["key_id"], k.as_str());
    assert_eq!(read_plain(&e.store, "images/b"), data);
    assert!(fs.lookup(ino(&fs, "images"), "b").is_ok());
    control(&fs, "snapshot", "disks/d snapshots/s").unwrap();
    wait_done(&e, &fs, "snapshots/s");
    assert_eq!(read_plain(&e.store, "snapshots/s"), data);
    control(&fs, "rekey", &format!("images/b key={sm4} mode=reencrypt")).unwrap();
    wait_done(&e, &fs, "images/b");
    assert_eq!(e.info("images/b")["cipher"], "sm4-xts-plain64");
    assert_eq!(read_plain(&e.store, "images/b"), data);
    control(&fs, "rekey", "disks/d key=alias/k").unwrap();
    wait_done(&e, &fs, "disks/d");
    assert_eq!(e.info("disks/d")["key_id"], k.as_str());
    control(&fs, "copy", "images/p images/pe encrypt").unwrap();
    wait_done(&e, &fs, "images/pe");
    assert_eq!(e.info("images/pe")["encrypted"], true);
    // Refusals: the write's errno, and the reason in jobs.
    assert_eq!(errno(control(&fs, "copy", "images/a")), libc::EINVAL);
    // Each write is its own request: a line split across two writes to one descriptor is
    // two, both refused.
    let i = ino(&fs, ".control/copy");
    let (fh, _) = fs.open(i, true).unwrap();
    assert_eq!(errno(fs.write(i, fh, 0, b"images/a")), libc::EINVAL);
    assert_eq!(errno(fs.write(i, fh, 8, b" images/y\n")), libc::EINVAL);
    fs.release(i, fh).unwrap();
    assert!(fs.lookup(ino(&fs, "images"), "y").is_err());
    assert_eq!(
        errno(control(&fs, "copy", "images/nope images/x")),
        libc::ENOENT
    );
    assert_eq!(
        errno(control(&fs, "copy", "images/a images/b")),
        libc::EEXIST
    );
    assert_eq!(
        errno(control(&fs, "copy", "images/a images/x unencrypted")),
        libc::EPERM
    );
    assert_eq!(
        errno(control(&fs, "rekey", &format!("images/a key={sm4}"))),
        libc::EPERM
    );
    assert_eq!(
        errno(control(&fs, "snapshot", "images/a snapshots/x")),
        libc::EINVAL
    );
    assert_eq!(
        errno(control(&fs, "copy", "images/a images/x key=alias/none")),
        libc::ENOENT
    );
    e.ok(&["key", "disable", &k]);
    assert_eq!(
        errno(control(&fs, "copy", "images/a images/x key=alias/k")),
        libc::EACCES
    );
    assert_eq!(
        errno(control(&fs, "copy", "disks/d images/x")),
        libc::EACCES
    );
    let lines = jobs(&fs);
    let rejected: Vec<&String> = lines.iter().filter(|l| l.contains(" rejected ")).collect();
    assert_eq!(rejected.len(), 11, "{lines:#?}");
    assert!(lines
        .iter()
        .any(|l| l.contains("encrypted images cannot be copied into unencrypted images")));
    assert!(lines.iter().any(|l| l.contains("Disabled")));
    for l in &lines {
        let f: Vec<&str> = l.splitn(8, ' ').collect();
        assert_eq!(f.len(), 8, "{l}");
        assert!(f[0].starts_with("job-"));
        f[5].parse::<u64>().unwrap();
        f[6].parse::<u64>().unwrap();
    }
    assert!(!e.store.join("images/x.eimg").exists());
    let cli = e.json(&["job", "list", "--json"]);
    assert_eq!(cli.as_array().unwrap().len(), lines.len());
}

#[test]
fn disabled_key_refuses_new_opens() {
    let e = Env::new();
    let k = e.key("k", "AES_256");
    e.ok(&["create", "disks/d", "--size", "1M", "--key", &k]);
    e.ok(&["create", "disks/other", "--size", "1M", "--encrypt"]);
    let fs = fs_for(&e, 1 << 20);
    let d = ino(&fs, "disks/d");
    let (fh, _) = fs.open(d, true).unwrap();
    e.ok(&["key", "disable", &k]);
    assert_eq!(errno(fs.open(d, false)), libc::EACCES);
    // The handle already open keeps working; other resources are unaffected.
    fs.write(d, fh, 0, b"still").unwrap();
    let (fo, _) = fs.open(ino(&fs, "disks/other"), true).unwrap();
    fs.release(0, fo).unwrap();
    fs.release(d, fh).unwrap();
    assert_eq!(errno(fs.open(d, false)), libc::EACCES);
    e.ok(&["key", "enable", &k]);
    e.ok(&["key", "schedule-deletion", &k, "--force"]);
    assert_eq!(errno(fs.open(d, false)), libc::EACCES);
}

#[test]
fn online_reencryption_while_writing() {
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 16 << 20, 9);
    e.ok(&["import", src.to_str().unwrap(), "disks/d", "--encrypt"]);
    let fs = std::sync::Arc::new(fs_for(&e, 256 << 10));
    let d = ino(&fs, "disks/d");
    let (fh, _) = fs.open(d, true).unwrap();
    control(&fs, "rekey", &format!("disks/d key={k2} mode=reencrypt")).unwrap();
    let mut model = data.clone();
    // Write and read across the whole disk while the job runs.
    let mut x = 12345u64;
    for n in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % ((16 << 20) - 5000);
        let buf = pattern(1 + (x % 4999) as usize, n);
        fs.write(d, fh, off, &buf).unwrap();
        model[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        let back = fs.read(d, fh, off.saturating_sub(700), 9000).unwrap();
        let s = off.saturating_sub(700) as usize;
        assert!(
            back[..] == model[s..s + back.len()],
            "read during re-encryption differs"
        );
    }
    wait_done(&e, &fs, "disks/d");
    fs.release(d, fh).unwrap();
    let i = e.info("disks/d");
    assert_eq!(i["key_id"], k2.as_str());
    assert!(i["reencrypt"].is_null());
    assert!(read_plain(&e.store, "disks/d") == model);
}

/// Concurrency model: four threads each own interleaved 300-byte slices of one disk (so
/// their writes share sectors), read and write at random against their own model, through
/// a cache small enough to evict constantly, while a re-encryption job rewrites every
/// sector underneath. Every read agrees with the owner's model; the end state agrees too.
#[test]
fn concurrent_model_with_eviction_and_a_job() {
    let e = Env::new();
    let k2 = e.key("k2", "SM4");
    const SIZE: usize = 8 << 20;
    const SLICE: usize = 300;
    e.ok(&[
        "create",
        "disks/c",
        "--size",
        &SIZE.to_string(),
        "--encrypt",
        "--sector-size",
        "4096",
    ]);
    let fs = std::sync::Arc::new(fs_for(&e, 64 << 10));
    let d = ino(&fs, "disks/c");
    let (fh, _) = fs.open(d, true).unwrap();
    // Fill every sector so the job has real work.
    for off in (0..SIZE).step_by(1 << 20) {
        fs.write(d, fh, off as u64, &[0u8; 1 << 20]).unwrap();
    }
    control(&fs, "rekey", &format!("disks/c key={k2} mode=reencrypt")).unwrap();
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let mut model = vec![0u8; SIZE];
                let mut x = 0x9E37_79B9u64 + t as u64;
                let slices = SIZE / SLICE;
                for n in 0..1500u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A slice this thread owns: index ≡ t (mod 4).
                    let s = ((x as usize) % (slices / 4)) * 4 + t;
                    let off = s * SLICE;
                    if x.is_multiple_of(3) {
                        let got = fs.read(d, fh, off as u64, SLICE as u32).unwrap();
                        assert!(
                            got[..] == model[off..off + SLICE],
                            "thread {t}: slice {s} differs at step {n}"
                        );
                    } else {
                        let b = pattern(SLICE, x);
                        fs.write(d, fh, off as u64, &b).unwrap();
                        model[off..off + SLICE].copy_from_slice(&b);
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    wait_done(&e, &fs, "disks/c");
    fs.release(d, fh).unwrap();
    let disk = read_plain(&e.store, "disks/c");
    for s in 0..SIZE / SLICE {
        let off = s * SLICE;
        let owner = s % 4;
        assert!(
            disk[off..off + SLICE] == models[owner][off..off + SLICE],
            "slice {s} wrong at the end"
        );
    }
    assert_eq!(e.info("disks/c")["cipher"], "sm4-xts-plain64");
}

/// Large sequential reads have a window after them read ahead through the page cache; writes
/// made in between, small (buffered) or large (direct), must show in what later reads of the
/// window return, whether those come in order or not. With a sector cache and without one
/// (large reads bypass it, so streams are read ahead either way).
#[test]
fn read_ahead_sees_writes_made_after_it() {
    read_ahead_sees_writes_with_cache(1 << 20);
    read_ahead_sees_writes_with_cache(0);
}

fn read_ahead_sees_writes_with_cache(cache: u64) {
    const RUN: usize = 256 << 10;
    // Larger than the read-ahead window (8 MiB), so streams start, slide and restart.
    const RUNS: usize = 48;
    let e = Env::new();
    let size = RUNS * RUN;
    e.ok(&[
        "create",
        "disks/s",
        "--size",
        &size.to_string(),
        "--encrypt",
    ]);
    let fs = fs_for(&e, cache);
    let d = ino(&fs, "disks/s");
    let (fh, _) = fs.open(d, true).unwrap();
    let mut model = pattern(size, 41);
    fs.write(d, fh, 0, &model).unwrap();
    for round in 0..3u64 {
        let mut at = 0;
        while at + RUN <= size {
            let i = at / RUN;
            // Now and then the run after this one first, as two requests in flight together
            // may arrive.
            let order: &[usize] = if i % 5 == 2 && at + 2 * RUN <= size {
                &[RUN, 0]
            } else {
                &[0]
            };
            for &o in order {
                let got = fs.read(d, fh, (at + o) as u64, RUN as u32).unwrap();
                assert!(
                    got[..] == model[at + o..at + o + RUN],
                    "round {round}: run at {} differs",
                    at + o
                );
            }
            // The furthest run read so far.
            let last = at + order[0];
            // Runs after it are being read ahead now: change one of them (1 to 5 runs on)
            // before it is read.
            let i = last / RUN;
            let next = last + RUN * (1 + (i + round as usize) % 5);
            if next + RUN <= size {
                let small = pattern(4096, round * 100 + last as u64);
                let o = next + (i % 7) * 8192;
                fs.write(d, fh, o as u64, &small).unwrap();
                model[o..o + 4096].copy_from_slice(&small);
                if i % 3 == round as usize {
                    let big = pattern(RUN, round * 1000 + last as u64);
                    fs.write(d, fh, next as u64, &big).unwrap();
                    model[next..next + RUN].copy_from_slice(&big);
                }
            }
            // Now and then, skip a run: the stream ends, and starts again after.
            at = last + if i % 11 == 10 { 2 * RUN } else { RUN };
        }
    }
    fs.release(d, fh).unwrap();
}

/// A stream's next request is decrypted ahead in the background. Here the reader pauses
/// after every request, so the run after it is decrypted (the pause gives the background
/// thread time; the assertions do not depend on it), and then something changes that run
/// before it is read: a small buffered write, a large direct one, a write elsewhere, or an
/// online re-encryption rewriting every sector underneath. Every read is the model's.
#[test]
fn a_run_decrypted_ahead_is_never_read_stale() {
    const RUN: usize = 256 << 10;
    const RUNS: usize = 40;
    let size = RUNS * RUN;
    for cipher in ["AES_256", "SM4"] {
        let e = Env::new();
        let k = e.key("k", cipher);
        let k2 = e.key("k2", cipher);
        let sz = size.to_string();
        e.ok(&["create", "disks/s", "--size", &sz, "--key", &k]);
        let fs = fs_for(&e, 1 << 20);
        let d = ino(&fs, "disks/s");
        let (fh, _) = fs.open(d, true).unwrap();
        let mut model = pattern(size, 43);
        fs.write(d, fh, 0, &model).unwrap();
        for round in 0..3usize {
            if round == 2 {
                control(&fs, "rekey", &format!("disks/s key={k2} mode=reencrypt")).unwrap();
            }
            for i in 0..RUNS {
                let at = i * RUN;
                let got = fs.read(d, fh, at as u64, RUN as u32).unwrap();
                assert!(
                    got[..] == model[at..at + RUN],
                    "{cipher}, round {round}: run {i} differs"
                );
                std::thread::sleep(std::time::Duration::from_millis(3));
                let next = at + RUN;
                if next + RUN > size || round == 2 {
                    continue;
                }
                let seed = (round * 1000 + i) as u64;
                let (o, len) = match (i + round) % 4 {
                    0 => (next + (i % 7) * 8192 + 100, 4096),
                    1 => (next, RUN),
                    2 => ((next + 3 * RUN) % (size - RUN), RUN / 2),
                    _ => continue,
                };
                let w = pattern(len, seed);
                fs.write(d, fh, o as u64, &w).unwrap();
                model[o..o + len].copy_from_slice(&w);
            }
        }
        wait_done(&e, &fs, "disks/s");
        fs.release(d, fh).unwrap();
        assert!(
            read_plain(&e.store, "disks/s") == model,
            "{cipher}: the store differs"
        );
    }
}

/// The stack below a request, painted before it and read after it. The probes read memory
/// below the current frame through raw addresses: outside Rust's model, but it is this
/// thread's own mapped stack, and the reads are volatile.
mod stack {
    pub const SPAN: usize = 96 << 10;
    const PAINT: u64 = 0xA5A5_A5A5_A5A5_A5A5;

    /// An address some way below the caller's frame.
    #[inline(never)]
    pub fn below_here() -> usize {
        let x = 0u8;
        (std::hint::black_box(&x) as *const u8 as usize - 4096) & !63
    }

    #[inline(never)]
    pub fn paint(top: usize) {
        for a in ((top - SPAN)..top).step_by(8) {
            // SAFETY: see the module doc.
            unsafe { std::ptr::write_volatile(a as *mut u64, PAINT) }
        }
    }

    /// The `SPAN` bytes below `top`, lowest address first.
    #[inline(never)]
    pub fn read(top: usize) -> Vec<u8> {
        ((top - SPAN)..top)
            // SAFETY: see the module doc.
            .map(|a| unsafe { std::ptr::read_volatile(a as *const u8) })
            .collect()
    }

    /// How far below the deepest zeros of the scrub (a run of 256 zero bytes) anything was
    /// written, in bytes; None if nothing was zeroed.
    pub fn written_below_zeros(bytes: &[u8]) -> Option<usize> {
        let dirty = bytes
            .chunks_exact(8)
            .position(|w| w != PAINT.to_ne_bytes())?
            * 8;
        let zeros = (dirty..bytes.len() - 256)
            .step_by(8)
            .find(|&i| bytes[i..i + 256].iter().all(|&b| b == 0))?;
        Some(zeros - dirty)
    }
}

/// No copy of a data key's schedule outlives a request on the serving thread's stack: the
/// cipher kernels spill round keys into their frames, and every request scrubs below itself
/// after. For AES-XTS the first round keys of both halves are the key's own bytes: neither is
/// anywhere below the request (without the scrub, the tweak key's is, four times: a spilled
/// register). For both ciphers, nothing was written below the scrub's zeros but the scrub's
/// own call of `memset` (a return address and a few registers), so no kernel frame reached
/// below what was scrubbed.
#[test]
fn no_key_schedule_is_left_on_the_stack_after_a_request() {
    for cipher in ["AES_256", "SM4"] {
        let e = Env::new();
        let k = e.key("k", cipher);
        e.ok(&["create", "disks/d", "--size", "4M", "--key", &k]);
        let dek = e.dek("disks/d");
        let fs = fs_for(&e, 1 << 20);
        let d = ino(&fs, "disks/d");
        let (fh, _) = fs.open(d, true).unwrap();
        fs.write(d, fh, 0, &pattern(2 << 20, 3)).unwrap();
        let top = stack::below_here();
        for (off, len) in [(8192u64, 4096u32), (4096, 65536), (0, 1 << 20), (700, 3000)] {
            for write in [false, true] {
                stack::paint(top);
                if write {
                    fs.write(d, fh, off, &pattern(len as usize, 9)).unwrap();
                } else {
                    drop(fs.read(d, fh, off, len).unwrap());
                }
                let below = stack::read(top);
                let what = format!("{cipher}, {len} bytes at {off}, write {write}");
                if cipher == "AES_256" {
                    for (half, key) in [("data", &dek[..16]), ("tweak", &dek[32..48])] {
                        assert!(
                            !below.windows(16).any(|w| w == key),
                            "{what}: the {half} key's first round key is on the stack"
                        );
                    }
                }
                let below_zeros = stack::written_below_zeros(&below).expect("nothing scrubbed");
                assert!(
                    below_zeros <= 128,
                    "{what}: {below_zeros} bytes written below the scrub"
                );
            }
        }
        fs.release(d, fh).unwrap();
    }
}

/// Which opens may keep the kernel's pages: a reopen of what nobody changed, or of what is
/// open already; never the first open, nor one after a change from outside while closed.
#[test]
fn the_kernel_keeps_pages_only_of_what_nothing_else_changed() {
    use encimg::fs::Caching::{Fresh, Keep};
    let e = Env::new();
    let src = e.path("a.raw");
    write_pattern(&src, 1 << 20, 1);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["create", "disks/d", "--size", "1M", "--encrypt"]);
    let fs = fs_for(&e, 1 << 20);
    let open = |p: &str, w: bool| {
        let i = ino(&fs, p);
        let (fh, c) = fs.open(i, w).unwrap();
        (i, fh, c)
    };
    let (i, fh, c) = open("images/a", false);
    assert_eq!(c, Fresh, "a first open");
    let (_, fh2, c2) = open("images/a", false);
    assert_eq!(c2, Keep, "open already");
    fs.release(i, fh2).unwrap();
    fs.release(i, fh).unwrap();
    let (_, fh, c) = open("images/a", false);
    assert_eq!(c, Keep, "unchanged since its last close");
    fs.release(i, fh).unwrap();
    // Deleted and made again by the CLI: fresh.
    e.ok(&["delete", "images/a"]);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    let (_, fh, c) = open("images/a", false);
    assert_eq!(c, Fresh, "made again under the same name");
    fs.release(i, fh).unwrap();
    // A disk written through the mount keeps its pages (the writes went through them)…
    let (d, fh, _) = open("disks/d", true);
    fs.write(d, fh, 4096, &[7u8; 4096]).unwrap();
    fs.release(d, fh).unwrap();
    let (_, fh, c) = open("disks/d", false);
    assert_eq!(c, Keep, "written only through the mount");
    fs.release(d, fh).unwrap();
    // …but not after a rewrap from the CLI touched its file while closed.
    let k = e.key("k2", "AES_256");
    e.ok(&["rekey", "disks/d", "--key", &k]);
    let (_, fh, c) = open("disks/d", false);
    assert_eq!(c, Fresh, "changed from the CLI while closed");
    fs.release(d, fh).unwrap();
}
