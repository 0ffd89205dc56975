//! Object-storage regions (SPEC §9) against a real S3 server process started here: s3s-fs
//! (crates.io; `contrib/test.sh` builds it into /var/tmp/encimg-tools). Configured as the
//! AWS tools are: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION.

mod common;
use common::*;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s3s_fs() -> Option<PathBuf> {
    let p = std::env::var_os("ENCIMG_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/encimg-tools/bin/s3s-fs".into());
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: needs s3s-fs (bash contrib/test.sh builds it)");
        None
    }
}

/// An s3s-fs server on a free port of 127.0.0.1 with one bucket, `bkt`.
struct S3 {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl S3 {
    fn start(bin: PathBuf, data: PathBuf) -> S3 {
        std::fs::create_dir_all(data.join("bkt")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3 {
            bin,
            data,
            port,
            child: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", "AKTEST", "--secret-key", "SKTEST-secret"])
            .arg(&self.data)
            // Every request the server routes, with its headers: what the tests count.
            .env("RUST_LOG", "s3s::service=debug,s3s::ops=debug")
            .env("NO_COLOR", "1")
            .stderr(Stdio::null())
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log())
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn env(&self, e: &mut Env) {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "AKTEST".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "SKTEST-secret".to_string()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_REGION", "us-east-1".to_string()),
        ] {
            e.vars.push((k.into(), v));
        }
    }

    fn log(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    /// The requests the server has received so far, one line each (method, path, headers).
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("req: Request {"))
            .map(|l| l.split("req: ").nth(1).unwrap_or(l).to_string())
            .collect()
    }

    /// The objects under a resource, as stored by the server (relative to the bucket).
    fn objects(&self, rel: &str) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        walk(&e.path(), out);
                    } else {
                        out.push(e.path());
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data.join("bkt").join(rel), &mut out);
        out.sort();
        out
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An s3s-fs server and a store with one S3 region, `s3r`, at `s3://bkt/PREFIX`; None (the
/// test skips) without s3s-fs.
fn s3_region(prefix: &str) -> Option<(Env, S3)> {
    let bin = s3s_fs()?;
    let mut e = Env::new();
    let s3 = S3::start(bin, e.path("s3"));
    s3.env(&mut e);
    e.ok(&[
        "region",
        "add",
        "s3r",
        "--location",
        &format!("s3://bkt/{prefix}"),
    ]);
    Some((e, s3))
}

#[test]
fn an_s3_region_keeps_images_as_block_objects_under_a_pointer() {
    let Some((e, s3)) = s3_region("team") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);

    // A sparse image: data, a hole of whole blocks, data.
    let mut data = vec![0u8; 24 << 20];
    data[..3 << 20].copy_from_slice(&pattern(3 << 20, 1));
    data[16 << 20..18 << 20].copy_from_slice(&pattern(2 << 20, 2));
    let raw = e.path("a.raw");
    std::fs::write(&raw, &data).unwrap();
    s.ok(&["import", raw.to_str().unwrap(), "images/a", "--encrypt"]);
    let list = s.json(&["list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let info = s.json(&["info", "images/a", "--json"]);
    assert_eq!(info["size"], data.len() as u64);
    assert_eq!(info["region"], "s3r");

    // In the bucket: the pointer and only the blocks that hold data (4 MiB each); nothing
    // left in the region's local directory.
    let objs = s3.objects("team/images/a.obj");
    let names: Vec<String> = objs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(names.contains(&"ptr".to_string()), "{names:?}");
    let blocks: Vec<&PathBuf> = objs.iter().filter(|p| !p.ends_with("ptr")).collect();
    let file_len = info["data_offset"].as_u64().unwrap() + data.len() as u64;
    assert!(
        blocks.len() < (file_len / (4 << 20)) as usize,
        "holes are not stored: {names:?}"
    );
    assert!(std::fs::read_dir(e.store.join("regions/s3r/images"))
        .unwrap()
        .next()
        .is_none());

    // The objects are §4's ciphertext: OpenSSL decrypts them, laid end to end, with the
    // data key the region's key store unwraps.
    let mut file = vec![0u8; file_len as usize];
    for b in &blocks {
        let n: usize = b.file_name().unwrap().to_string_lossy().parse().unwrap();
        let bytes = std::fs::read(b).unwrap();
        file[n * (4 << 20)..n * (4 << 20) + bytes.len()].copy_from_slice(&bytes);
    }
    let joined = e.path("joined.eimg");
    std::fs::write(&joined, &file).unwrap();
    let dek = hex::decode(s.ok(&["dek", "images/a", "--reveal"]).trim()).unwrap();
    let plain = openssl_decrypt_with(
        &joined,
        &dek,
        info["data_offset"].as_u64().unwrap(),
        info["sector_size"].as_u64().unwrap(),
        data.len() as u64,
        info["cipher"].as_str().unwrap(),
    );
    assert_eq!(plain, data);

    // Copies in, within and out; rekeys; all read back the same.
    let local = e.path("l.raw");
    let ldata = write_pattern(&local, 6 << 20, 3);
    e.ok(&["import", local.to_str().unwrap(), "images/l", "--encrypt"]);
    e.ok(&["copy", "images/l", "images/l", "--to-region", "s3r"]);
    s.ok(&["copy", "images/a", "images/a2"]);
    s.ok(&["key", "create", "--alias", "k"]);
    s.ok(&["rekey", "images/a2", "--key", "alias/k"]);
    s.ok(&["rekey", "images/l", "--key", "alias/k", "--reencrypt"]);
    for (res, want) in [("images/a2", &data), ("images/l", &ldata)] {
        let back = format!("{}-back", res.replace('/', "-"));
        let back = format!("images/{back}");
        s.ok(&["copy", res, &back, "--to-region", "local"]);
        assert_eq!(&read_plain(&e.store, &back), want, "{res}");
    }
    assert_eq!(s.json(&["list", "--json"]).as_array().unwrap().len(), 3);
    s.fail(&["import", raw.to_str().unwrap(), "images/a"], 4);

    // Delete: the pointer and blocks go.
    s.ok(&["delete", "images/a2"]);
    assert!(s3.objects("team/images/a2.obj").is_empty());
    assert_eq!(s.json(&["list", "--json"]).as_array().unwrap().len(), 2);
    // A region that holds resources is not removed.
    s.fail(&["region", "remove", "s3r"], 5);
}

#[test]
fn s3_failures_are_one_clear_line_and_nothing_stored_is_lost() {
    let Some(bin) = s3s_fs() else { return };
    let mut e = Env::new();
    let mut s3 = S3::start(bin, e.path("s3"));
    s3.env(&mut e);
    let err = e.fail(
        &["region", "add", "nob", "--location", "s3://nobucket/x"],
        3,
    );
    assert!(err.contains("bucket nobucket does not exist"), "{err}");
    e.ok(&["region", "add", "s3r", "--location", "s3://bkt/p"]);
    let raw = e.path("a.raw");
    let data = write_pattern(&raw, 5 << 20, 9);
    e.ok(&[
        "--region",
        "s3r",
        "import",
        raw.to_str().unwrap(),
        "images/a",
        "--encrypt",
    ]);

    // Wrong credentials: one line, exit 5.
    let mut bad = Env::bare();
    bad.store = e.store.clone();
    s3.env(&mut bad);
    for v in bad.vars.iter_mut() {
        if v.0 == "AWS_SECRET_ACCESS_KEY" {
            v.1 = "wrong".into();
        }
    }
    let err = bad.fail(&["--region", "s3r", "list"], 5);
    assert!(err.contains("credentials are refused"), "{err}");

    // The server goes away: a bounded wait, exit 9 naming it; nothing half-made.
    s3.stop();
    let t = Instant::now();
    let err = e.fail(&["--region", "s3r", "--kms-timeout", "2", "list"], 9);
    assert!(err.contains("unreachable"), "{err}");
    let err = e.fail(
        &[
            "--region",
            "s3r",
            "--kms-timeout",
            "2",
            "import",
            raw.to_str().unwrap(),
            "images/b",
        ],
        9,
    );
    assert!(err.contains("S3 s3://bkt/p"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Back: what was stored is whole, and the failed import left nothing.
    s3.run();
    let list = e.json(&["--region", "s3r", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Hung (it accepts connections and never answers): the request fails within about one
    // `--kms-timeout`, not one per try (it took two, 4.2 s for 2, when a try that timed out
    // was tried again).
    let pid = s3.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals to the server this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    let out = e.run(&["--region", "s3r", "--kms-timeout", "2", "list"]);
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(
        err.contains("unreachable") && err.contains("(1 try in"),
        "{err}"
    );
    assert!(took < Duration::from_millis(3900), "{took:?}: {err}");
    e.ok(&[
        "--region",
        "s3r",
        "copy",
        "images/a",
        "images/a",
        "--to-region",
        "local",
    ]);
    assert_eq!(read_plain(&e.store, "images/a"), data);
}

/// Allocated bytes of the files under `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn an_s3_region_mounts_read_only_and_reads_only_the_blocks_it_needs() {
    use common::mount::*;
    if !can_mount_with("e2fsck") {
        return;
    }
    let Some((e, mut s3)) = s3_region("m") else {
        return;
    };
    // An ext4 filesystem of 64 MiB, full of data, so a whole read would fetch every block.
    let raw = e.path("fs.raw");
    let root = e.path("root");
    std::fs::create_dir_all(&root).unwrap();
    write_pattern(&root.join("data.bin"), 40 << 20, 5);
    sh(&format!(
        "truncate -s 64M {} && mkfs.ext4 -q -d {} {}",
        raw.display(),
        root.display(),
        raw.display()
    ));
    e.ok(&[
        "--region",
        "s3r",
        "import",
        raw.to_str().unwrap(),
        "images/fs",
        "--encrypt",
    ]);

    let mut m = Mounted::new(&e, &["--region", "s3r"]);
    let cache = e.store.join("regions/s3r/cache/images");
    let before = s3.requests().len();
    let len = std::fs::metadata(m.p("images/fs")).unwrap().len();
    assert_eq!(len, 64 << 20);
    // A small read fetches a block or two, not the image.
    let mut f = std::fs::File::open(m.p("images/fs")).unwrap();
    let mut b = vec![0u8; 4096];
    use std::io::Read;
    f.read_exact(&mut b).unwrap();
    drop(f);
    // What is fetched ahead in the background has landed by now.
    std::thread::sleep(Duration::from_millis(1500));
    // The first byte of a cold image waits for three requests: the pointer (which carries
    // the header: block 0 is never fetched), the key store (read at most once per 5 s), then
    // a ranged GET of the chunk read. Whatever else went is the rest of the block and the
    // next one, fetched after it.
    let reqs = s3.requests()[before..].to_vec();
    let keystore = reqs
        .iter()
        .filter(|r| r.contains("/keys/keystore.json"))
        .count();
    assert!(keystore <= 1, "the key store is read once: {reqs:#?}");
    let reqs: Vec<String> = reqs
        .into_iter()
        .filter(|r| !r.contains("/keys/keystore.json"))
        .collect();
    let ptr = reqs
        .iter()
        .filter(|r| r.contains("/images/fs.obj/ptr"))
        .count();
    assert_eq!(ptr, 1, "the pointer is read once: {reqs:#?}");
    assert!(
        !reqs.iter().any(|r| r.contains("/0,") || r.contains("/0 ")),
        "block 0 was fetched: {reqs:#?}"
    );
    let data: Vec<&String> = reqs
        .iter()
        .filter(|r| r.contains("method: GET") && !r.contains("/ptr"))
        .collect();
    assert!(
        data.first()
            .is_some_and(|r| r.contains("\"range\": \"bytes=0-65535\"")),
        "the first data request is not a ranged GET of the chunk read: {reqs:#?}"
    );
    assert!(data.len() <= 3, "{reqs:#?}");
    let after_small = allocated(&cache);
    assert!(
        after_small <= 12 << 20,
        "{after_small} bytes cached after 4 KiB"
    );
    // The whole image, through the mount, is the imported one; ext4 checks clean.
    sh(&format!(
        "cmp {} {}",
        raw.display(),
        m.p("images/fs").display()
    ));
    let dir = m.loop_mount("images/fs", ",ro");
    sh(&format!(
        "cmp {} {}",
        root.join("data.bin").display(),
        dir.join("data.bin").display()
    ));
    m.loop_umount(&dir);
    sh(&format!("e2fsck -fn {}", m.p("images/fs").display()));
    // Images are read-only: nothing is written back.
    let o = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1", "conv=notrunc,nocreat"])
        .arg(format!("of={}", m.p("images/fs").display()))
        .output()
        .unwrap();
    assert!(!o.status.success());
    m.umount();

    // A bounded cache elsewhere: what nobody has open is dropped past the bound.
    let own_cache = e.path("objcache");
    let mut m = Mounted::new(
        &e,
        &[
            "--region",
            "s3r",
            "--object-cache",
            own_cache.to_str().unwrap(),
            "--object-cache-size",
            "1M",
        ],
    );
    sh(&format!(
        "cmp {} {}",
        raw.display(),
        m.p("images/fs").display()
    ));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        allocated(&own_cache.join("images")) < 1 << 20,
        "the cache kept its copy"
    );
    assert!(
        own_cache.join("mount.log").exists(),
        "the cache given was used"
    );

    // The server goes away mid-use: an unfetched read fails with EIO within a bound; once
    // it is back, the same mount reads again.
    s3.stop();
    let t = Instant::now();
    let r = std::fs::read(m.p("images/fs"));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    s3.run();
    sh(&format!(
        "cmp {} {}",
        raw.display(),
        m.p("images/fs").display()
    ));
    m.loops.clear();
    m.umount();
}

#[test]
fn an_s3_disk_is_writable_and_fsync_means_durable_in_the_store() {
    use common::mount::*;
    use std::os::unix::fs::FileExt;
    if !can_mount_with("fio") {
        return;
    }
    let Some((e, mut s3)) = s3_region("w") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    s.ok(&["create", "disks/d", "--size", "32M", "--encrypt"]);
    s.ok(&["create", "disks/f", "--size", "32M", "--encrypt"]);
    let praw = e.path("p.raw");
    let mut pdata = write_pattern(&praw, 16 << 20, 22);
    s.ok(&["import", praw.to_str().unwrap(), "disks/p", "--encrypt"]);

    let m = Mounted::new(&e, &["--region", "s3r"]);
    // fio writes and verifies through the mount.
    sh(&format!(
        "fio --name=v --filename={} --size=16M --bs=64k --rw=randwrite --verify=crc32c \
         --direct=1 --ioengine=psync --fsync=8 --output=/dev/null",
        m.p("disks/f").display()
    ));
    // A write, fsync'd, then the daemon is killed: the write is in the object store.
    let data = pattern(8 << 20, 21);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    f.write_all_at(&data, 3 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // A small unaligned write into a block of stored data nobody has read: the block goes
    // back whole, the write inside it, the rest as it was.
    let patch = pattern(4096, 23);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/p"))
        .unwrap();
    f.write_all_at(&patch, (9 << 20) + 1000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    pdata[(9 << 20) + 1000..(9 << 20) + 1000 + 4096].copy_from_slice(&patch);
    // The server stops under a write: its fsync fails with EIO within a bound (the write is
    // not acknowledged as durable), and once the server is back the next fsync sends it.
    let late = pattern(1 << 20, 24);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    f.write_all_at(&late, 20 << 20).unwrap();
    s3.stop();
    let t = Instant::now();
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    s3.run();
    f.sync_all().unwrap();
    drop(f);
    m.kill_daemon();
    std::mem::forget(m);
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    // Read back from the store alone, through the CLI and OpenSSL.
    s.ok(&["snapshot", "disks/d", "snapshots/s"]);
    s.ok(&["copy", "snapshots/s", "snapshots/s", "--to-region", "local"]);
    let back = read_plain(&e.store, "snapshots/s");
    assert_eq!(&back[3 << 20..11 << 20], &data[..]);
    assert!(back[..3 << 20].iter().all(|&b| b == 0));
    assert_eq!(&back[20 << 20..21 << 20], &late[..]);
    s.ok(&["snapshot", "disks/p", "snapshots/p"]);
    s.ok(&["copy", "snapshots/p", "snapshots/p", "--to-region", "local"]);
    assert!(
        read_plain(&e.store, "snapshots/p") == pdata,
        "disks/p is not the write over the stored data"
    );
}

/// A block that is stored but that the server no longer has (lost, or a wrong 404) is an
/// error, never a hole: reading it gives EIO, not the decryption of zeros, and a write into
/// it fails at fsync without sending zeros over the block. A block that was never stored
/// still reads as zeros.
#[test]
fn a_block_the_server_lost_is_an_error_not_a_hole() {
    use common::mount::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if !can_mount() {
        return;
    }
    let Some((e, s3)) = s3_region("l") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    // 16 MiB of payload after the 4 MiB header area: plaintext [4k MiB, 4k+4 MiB) is block k+1.
    s.ok(&["create", "disks/d", "--size", "16M", "--encrypt"]);
    let (one, three) = (pattern(1 << 20, 41), pattern(1 << 20, 43));
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    f.write_all_at(&one, 0).unwrap();
    f.write_all_at(&three, 8 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    let blocks = |name: &str| -> Vec<PathBuf> {
        s3.objects("l/disks/d.obj")
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|f| f == name))
            .collect()
    };
    assert_eq!(blocks("1").len(), 1, "{:?}", s3.objects("l/disks/d.obj"));
    assert_eq!(blocks("3").len(), 1);
    assert!(
        blocks("2").is_empty(),
        "a block never written is not stored"
    );

    let m = Mounted::new(&e, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("disks/d"))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    // Never stored: zeros.
    f.read_exact_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a hole read as data");
    // Block 3 is lost behind the mount's back.
    std::fs::remove_file(&blocks("3")[0]).unwrap();
    let err = f.read_exact_at(&mut buf, 8 << 20).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "a lost block read as {err:?}"
    );
    // A write into it is not made durable over zeros.
    buf.fill(0x77);
    let before = s3.requests().len();
    let w = f.write_all_at(&buf, (9 << 20) + 4096);
    let synced = w.and_then(|()| f.sync_all());
    assert_eq!(
        synced.unwrap_err().raw_os_error(),
        Some(libc::EIO),
        "a write into a lost block was acknowledged as durable"
    );
    assert!(
        blocks("3").is_empty(),
        "zeros were sent over the lost block"
    );
    assert!(
        !s3.requests()[before..]
            .iter()
            .any(|r| r.contains("method: PUT") && r.contains("/disks/d.obj/")),
        "a block was sent"
    );
    // What the server still has reads back.
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == one[..4096], "stored data did not read back");
    drop(f);
    m.kill_daemon();
    std::mem::forget(m);
}

/// fsync(2) is of the file, not of the descriptor: a write through one descriptor is made
/// durable by an fsync through another, read-only one, while the writer is still open (it
/// never closes: the daemon is killed first). Here durable means in the object store: the
/// block is sent before the fsync returns, and reads back from the store alone.
#[test]
fn an_fsync_through_another_descriptor_makes_the_write_durable() {
    use common::mount::*;
    use std::os::unix::fs::FileExt;
    if !can_mount() {
        return;
    }
    let Some((e, s3)) = s3_region("f") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    s.ok(&["create", "disks/d", "--size", "8M", "--encrypt"]);
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    let data = pattern(1 << 20, 31);
    writer.write_all_at(&data, 2 << 20).unwrap();
    let reader = std::fs::File::open(m.p("disks/d")).unwrap();
    let before = s3.requests().len();
    reader.sync_all().unwrap();
    // Sent before the fsync returned (the server logs a request as it takes it).
    let puts = s3.requests()[before..]
        .iter()
        .filter(|r| r.contains("method: PUT") && r.contains("/disks/d.obj/"))
        .count();
    assert!(
        puts >= 1,
        "the fsync returned before the write's block was sent"
    );
    m.kill_daemon();
    std::mem::forget(m);
    drop((writer, reader));
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    s.ok(&["snapshot", "disks/d", "snapshots/s"]);
    s.ok(&["copy", "snapshots/s", "snapshots/s", "--to-region", "local"]);
    let back = read_plain(&e.store, "snapshots/s");
    assert!(
        back[2 << 20..3 << 20] == data[..],
        "the write fsync'd through another descriptor is not in the store"
    );
}

/// A CLI write killed after some of a new version's blocks are in the store and before its
/// pointer: the pointer still names the old version, which reads back whole; the resource is
/// listed once; a later write of the same resource works.
#[test]
fn a_push_killed_between_its_blocks_and_its_pointer_leaves_the_old_version_whole() {
    let Some((e, _s3)) = s3_region("c") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    let raw = e.path("big.raw");
    let data = write_pattern(&raw, 96 << 20, 9);
    s.ok(&["import", raw.to_str().unwrap(), "images/big", "--encrypt"]);
    s.ok(&["key", "create", "--alias", "k"]);
    s.ok(&["key", "create", "--alias", "k2"]);
    let obj = e.path("s3").join("bkt/c/images/big.obj");
    let ptr = std::fs::read(obj.join("ptr")).unwrap();
    let versions = || -> Vec<PathBuf> {
        std::fs::read_dir(&obj)
            .unwrap()
            .flatten()
            .map(|d| d.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    let old = versions();
    assert_eq!(old.len(), 1);

    // A re-encryption writes a whole new version; kill it once its first blocks are stored.
    let mut child = e
        .cmd()
        .args([
            "--region",
            "s3r",
            "rekey",
            "images/big",
            "--key",
            "alias/k",
            "--reencrypt",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let started = versions().into_iter().filter(|v| v != &old[0]).any(|v| {
            std::fs::read_dir(v)
                .map(|d| d.count() >= 2)
                .unwrap_or(false)
        });
        let exited = child.try_wait().unwrap().is_some();
        if started || exited || t.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the push finished before it could be killed"
    );
    assert_eq!(versions().len(), 2, "no new version was under way");
    assert_eq!(
        std::fs::read(obj.join("ptr")).unwrap(),
        ptr,
        "the pointer moved before the blocks were all in"
    );

    // The old version is whole: read back through the CLI, equal.
    assert_eq!(s.json(&["list", "--json"]).as_array().unwrap().len(), 1);
    s.ok(&["copy", "images/big", "images/back", "--to-region", "local"]);
    assert_eq!(read_plain(&e.store, "images/back"), data);
    // And the resource takes a new version afterwards.
    s.ok(&["rekey", "images/big", "--key", "alias/k2", "--reencrypt"]);
    s.ok(&["copy", "images/big", "images/back2", "--to-region", "local"]);
    assert_eq!(read_plain(&e.store, "images/back2"), data);
}

/// The CLI and a mount of one S3 region: the CLI's rekey or delete of a resource the mount
/// has open is refused (the rekey's new version would have left the mount's fsync'd writes
/// in the version it dropped); and a mount that kept its window on an image after closing
/// it reads the new version once the CLI has rekeyed it (the old one's blocks were gone,
/// and read back as garbage).
#[test]
fn the_cli_and_a_mount_of_an_s3_region_see_each_other() {
    use common::mount::*;
    use std::os::unix::fs::FileExt;
    if !can_mount() {
        return;
    }
    let Some((e, _s3)) = s3_region("x") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    let k1 = s.ok(&["key", "create", "--alias", "k1"]).trim().to_string();
    let k1 = k1.as_str();
    s.ok(&["create", "disks/d", "--size", "16M", "--encrypt"]);
    let img = e.path("img.raw");
    let data = write_pattern(&img, 20 << 20, 71);
    s.ok(&["import", img.to_str().unwrap(), "images/h", "--encrypt"]);
    let m = Mounted::new(&e, &["--region", "s3r"]);

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    let a = pattern(1 << 20, 72);
    f.write_all_at(&a, 0).unwrap();
    f.sync_all().unwrap();
    for cmd in [
        vec!["rekey", "disks/d", "--key", k1, "--reencrypt"],
        vec!["rekey", "disks/d", "--key", k1],
        vec!["delete", "disks/d"],
    ] {
        let err = s.fail(&cmd, 7);
        assert!(err.contains("open through a mount"), "{cmd:?}: {err}");
    }
    let b = pattern(1 << 20, 73);
    f.write_all_at(&b, 8 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Read a little of the image (its window is kept after the close), rekey it from the
    // CLI, read it all.
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(m.p("images/h"))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    s.ok(&["rekey", "images/h", "--key", k1, "--reencrypt"]);
    assert!(
        std::fs::read(m.p("images/h")).unwrap() == data,
        "a stale window"
    );
    m.umount();

    // Both writes are in the store.
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let back = std::fs::read(m.p("disks/d")).unwrap();
    assert!(back[..1 << 20] == a[..] && back[8 << 20..9 << 20] == b[..]);
    m.umount();
}

/// A server that stops answering (stopped, not gone) while an fsync sends its blocks: the
/// fsync fails within the key-service timeout's bound instead of waiting for it forever,
/// and once the server is back the next fsync makes the write durable.
#[test]
fn an_fsync_against_a_hung_server_fails_in_bounded_time_and_succeeds_later() {
    use common::mount::*;
    use std::os::unix::fs::FileExt;
    if !can_mount() {
        return;
    }
    let Some((mut e, s3)) = s3_region("h") else {
        return;
    };
    e.vars.push(("ENCIMG_KMS_TIMEOUT".into(), "2".into()));
    let s = e.with(&["--region", "s3r"]);
    s.ok(&["create", "disks/d", "--size", "32M", "--encrypt"]);
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/d"))
        .unwrap();
    let data = pattern(16 << 20, 81);
    f.write_all_at(&data, 0).unwrap();
    let pid = s3.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals to the server this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    let r = f.sync_all();
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(took < Duration::from_secs(60), "fsync waited {took:?}");
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    let m = Mounted::new(&e, &["--region", "s3r"]);
    assert!(std::fs::read(m.p("disks/d")).unwrap()[..16 << 20] == data[..]);
    m.umount();
}

/// A mount of an S3 region holds only what was read of its resources, and sends back only a
/// disk's written blocks: a control-file job there would have copied unread ranges as zeros
/// into a resource only this host had. It is refused (EPERM), saying to use the CLI.
#[test]
fn control_jobs_on_an_s3_mount_are_refused_for_the_cli() {
    use common::mount::*;
    if !can_mount() {
        return;
    }
    let Some((e, _s3)) = s3_region("c") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    let img = e.path("img.raw");
    write_pattern(&img, 8 << 20, 91);
    s.ok(&["import", img.to_str().unwrap(), "images/a", "--encrypt"]);
    let m = Mounted::new(&e, &["--region", "s3r"]);
    std::fs::metadata(m.p("images/a")).unwrap();
    for (file, line) in [
        ("copy", "images/a images/b\n"),
        ("rekey", "images/a key=alias/acs/ecs\n"),
    ] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.p(&format!(".control/{file}")))
            .unwrap();
        let err = std::os::unix::fs::FileExt::write_all_at(&f, line.as_bytes(), 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{file}: {err}");
    }
    let jobs = std::fs::read_to_string(m.p(".control/jobs")).unwrap();
    assert!(jobs.contains("run through the CLI"), "{jobs}");
    m.umount();
    // The CLI does it.
    s.ok(&["copy", "images/a", "images/b"]);
}

/// An S3 region is a place: its endpoint is recorded when it is added. Another endpoint in
/// the environment later is refused (the same bucket name there is another place: its
/// emptiness read as the region's, and `region remove` then deleted the region's only root
/// key); with none, the recorded one is used.
#[test]
fn an_s3_region_keeps_the_endpoint_it_was_added_at() {
    let Some((e, _s3)) = s3_region("p") else {
        return;
    };
    let img = e.path("img.raw");
    write_pattern(&img, 4 << 20, 95);
    e.ok(&[
        "--region",
        "s3r",
        "import",
        img.to_str().unwrap(),
        "images/a",
        "--encrypt",
    ]);
    let elsewhere = |args: &[&str]| {
        e.cmd()
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["--region", "s3r", "list"][..],
        &["region", "remove", "s3r"][..],
    ] {
        let o = elsewhere(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is at http://127.0.0.1:"), "{err}");
    }
    // With no endpoint in the environment, the region's own: its image is there, and its
    // removal is refused for it.
    let here = |args: &[&str]| {
        e.cmd()
            .env_remove("AWS_ENDPOINT_URL")
            .args(args)
            .output()
            .unwrap()
    };
    let listed = here(&["--region", "s3r", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("images/a"),
        "{listed:?}"
    );
    assert_eq!(here(&["region", "remove", "s3r"]).status.code(), Some(5));
    assert!(e.store.join("regions/s3r/keys").exists());

    // The same bucket and prefix at another server is another place: a region of its own.
    // At this server again, it is refused, however the endpoint is spelt.
    let other = S3::start(s3s_fs().unwrap(), e.path("s3-other"));
    let at = |port: u16, host: &str, args: &[&str]| {
        e.cmd()
            .env("AWS_ENDPOINT_URL", format!("http://{host}:{port}"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = at(
        other.port,
        "127.0.0.1",
        &["region", "add", "s3r2", "--location", "s3://bkt/p"],
    );
    assert!(o.status.success(), "{o:?}");
    let o = at(
        other.port,
        "127.0.0.1",
        &["--region", "s3r2", "list", "--json"],
    );
    assert!(o.status.success(), "{o:?}");
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let add3 = ["region", "add", "s3r3", "--location", "s3://bkt/p"];
    let o = at(_s3.port, "127.0.0.1", &add3);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = at(_s3.port, "localhost", &add3);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("holds region s3r's key store"),
        "{o:?}"
    );
    assert!(!e.store.join("regions/s3r3").exists());
    let listed = here(&["--region", "s3r", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("images/a"));
}

/// The pointer names the blocks its version was pushed with: one the server lost while no
/// mount was looking is an error, through a fresh mount (EIO) and to the CLI (exit 8, no
/// copy made), not zeros (a cross-region copy passed the zeros on, under a fresh key).
#[test]
fn a_block_lost_before_any_mount_is_an_error_everywhere() {
    use common::mount::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some((e, s3)) = s3_region("g") else {
        return;
    };
    let img = e.path("img.raw");
    let data = write_pattern(&img, 20 << 20, 97);
    e.ok(&[
        "--region",
        "s3r",
        "import",
        img.to_str().unwrap(),
        "images/a",
        "--encrypt",
    ]);
    // Plaintext [8 MiB, 12 MiB) is block 3 (the header area is block 0).
    let three: Vec<PathBuf> = s3
        .objects("g/images/a.obj")
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f == "3"))
        .collect();
    assert_eq!(three.len(), 1);
    std::fs::remove_file(&three[0]).unwrap();
    let err = e.fail(
        &[
            "--region",
            "s3r",
            "copy",
            "images/a",
            "images/a",
            "--to-region",
            "local",
        ],
        8,
    );
    assert!(err.contains("block 3"), "{err}");
    assert!(e.run(&["info", "images/a"]).status.code() == Some(3));
    if !can_mount() {
        return;
    }
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("images/a"))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    let err = f.read_exact_at(&mut buf, 9 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err:?}");
    drop(f);

    // A block a mount writes for the first time (after the push) goes into the pointer's
    // map at its fsync: lost before anyone lists the version, it is an error too.
    e.ok(&[
        "--region",
        "s3r",
        "create",
        "disks/d",
        "--size",
        "32M",
        "--encrypt",
    ]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("disks/d"))
        .unwrap();
    let block = pattern(1 << 20, 98);
    f.write_all_at(&block, 13 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    let four: Vec<PathBuf> = s3
        .objects("g/disks/d.obj")
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f == "4"))
        .collect();
    assert_eq!(four.len(), 1, "{:?}", s3.objects("g/disks/d.obj"));
    std::fs::remove_file(&four[0]).unwrap();
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("disks/d"))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = f.read_exact_at(&mut buf, 13 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err:?}");
    // A block never written is still a hole.
    f.read_exact_at(&mut buf, 20 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    m.umount();
}

/// Destinations of a cross-region copy are independent: one in an S3 store that does not
/// answer fails alone, and the others get their copy (it stopped the whole copy before
/// anything was written).
#[test]
fn a_copy_to_regions_goes_on_without_an_s3_region_that_is_down() {
    let Some((mut e, mut s3)) = s3_region("d") else {
        return;
    };
    e.vars.push(("ENCIMG_KMS_TIMEOUT".into(), "1".into()));
    e.ok(&["region", "add", "r1"]);
    let img = e.path("img.raw");
    write_pattern(&img, 4 << 20, 99);
    e.ok(&["import", img.to_str().unwrap(), "images/a", "--encrypt"]);
    s3.stop();
    let o = e.run(&["copy", "images/a", "images/a", "--to-region", "s3r,r1"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(9), "{out}{err}");
    assert!(
        out.contains("s3r: failed") && out.contains("r1: images/a"),
        "{out}{err}"
    );
    e.ok(&["--region", "r1", "info", "images/a"]);
}

/// A mount's copy of a resource it only looked up (`stat`, `ls -l`), then rekeyed by the
/// CLI: the next open must use the new version. It used the old one, and a write fsync'd
/// there went to the version the rekey dropped.
#[test]
fn a_resource_only_looked_up_then_rekeyed_by_the_cli_opens_at_its_new_version() {
    use common::mount::*;
    use std::os::unix::fs::FileExt;
    if !can_mount() {
        return;
    }
    let Some((e, _s3)) = s3_region("u") else {
        return;
    };
    let s = e.with(&["--region", "s3r"]);
    let k1 = s.ok(&["key", "create", "--alias", "k1"]).trim().to_string();
    let m = Mounted::new(&e, &["--region", "s3r"]);
    s.ok(&["create", "disks/e", "--size", "16M", "--encrypt"]);
    assert_eq!(std::fs::metadata(m.p("disks/e")).unwrap().len(), 16 << 20);
    s.ok(&["rekey", "disks/e", "--key", &k1]);
    let b = pattern(1 << 20, 111);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/e"))
        .unwrap();
    f.write_all_at(&b, 4 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    std::fs::remove_dir_all(e.store.join("regions/s3r/cache")).unwrap();
    let m = Mounted::new(&e, &["--region", "s3r"]);
    let back = std::fs::read(m.p("disks/e")).unwrap();
    assert!(back[4 << 20..5 << 20] == b[..], "the fsync'd write is lost");
    m.umount();
}
/// What a relay in front of the server does to what passes through it.
enum Relay {
    /// Holds each PUT while `on` is set (counting it in `held`), until `on` is cleared.
    HoldPuts(std::sync::Arc<Hold>),
    /// Renames every reply's `ETag` header (`XTag`, the same length): a server that sends none.
    NoETags,
}

#[derive(Default)]
struct Hold {
    on: std::sync::atomic::AtomicBool,
    held: std::sync::atomic::AtomicUsize,
}

/// A TCP relay on 127.0.0.1 to the server at `upstream`; returns its port. Its threads
/// end with the connections (the test process's end stops the listener).
fn relay(upstream: u16, what: Relay) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let what = std::sync::Arc::new(what);
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let what = what.clone();
            std::thread::spawn(move || {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let strip = matches!(*what, Relay::NoETags);
                std::thread::spawn(move || {
                    if !strip {
                        let _ = std::io::copy(&mut up2, &mut c2);
                        return;
                    }
                    // Replies, with "\r\netag:" made "\r\nxtag:" wherever a read splits it:
                    // the last 6 bytes of a read wait for the next, or for 20 ms of quiet.
                    let _ = up2.set_read_timeout(Some(Duration::from_millis(20)));
                    let mut pending: Vec<u8> = Vec::new();
                    let mut b = vec![0u8; 1 << 16];
                    loop {
                        let keep = match up2.read(&mut b) {
                            Ok(0) => break,
                            Ok(n) => {
                                pending.extend_from_slice(&b[..n]);
                                for i in 0..pending.len().saturating_sub(6) {
                                    if pending[i..i + 7].eq_ignore_ascii_case(b"\r\netag:") {
                                        pending[i + 2] = b'x';
                                    }
                                }
                                pending.len().min(6)
                            }
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut =>
                            {
                                0
                            }
                            Err(_) => break,
                        };
                        let out: Vec<u8> = pending.drain(..pending.len() - keep).collect();
                        if c2.write_all(&out).is_err() {
                            return;
                        }
                    }
                    let _ = c2.write_all(&pending);
                });
                let (mut c, mut up) = (c, up);
                let mut b = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = c.read(&mut b) {
                    if let Relay::HoldPuts(h) = &*what {
                        use std::sync::atomic::Ordering::SeqCst;
                        if b.starts_with(b"PUT ") && h.on.load(SeqCst) {
                            h.held.fetch_add(1, SeqCst);
                            let t = std::time::Instant::now();
                            while h.on.load(SeqCst) && t.elapsed() < Duration::from_secs(60) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    if up.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Put an S3 region's key store back as it was before key stores were objects: its records
/// in the host's local file, no object (`obj`) in the bucket, no generation seen. Returns
/// the local file.
fn back_to_a_local_file(obj: &Path, host: &Env, region: &str) -> PathBuf {
    let envelope: serde_json::Value = serde_json::from_slice(&std::fs::read(obj).unwrap()).unwrap();
    let keys = host.store.join("regions").join(region).join("keys");
    let local = keys.join("keystore.json");
    std::fs::write(&local, envelope["keystore"].as_str().unwrap()).unwrap();
    std::fs::remove_file(obj).unwrap();
    std::fs::remove_file(keys.join("generation")).unwrap();
    local
}

/// SPEC §9: an S3 region's key records are an object beside its resources, tagged under
/// the region's root key (which stays on the host, or comes from the passphrase). A second
/// host with the passphrase opens the region from the bucket alone and sees one key state
/// with the first; a state flipped in the bucket, or an older object put back, is refused;
/// removing the region removes the object.
#[test]
fn an_s3_regions_key_records_are_an_object_a_second_host_shares() {
    let Some(bin) = s3s_fs() else {
        return;
    };
    let host = |s3: &S3| {
        let mut e = Env::new();
        s3.env(&mut e);
        e.vars
            .push(("ENCIMG_PASSPHRASE".into(), "correct horse battery".into()));
        e
    };
    let first = Env::new();
    let s3 = S3::start(bin, first.path("s3"));
    let a = host(&s3);
    a.ok(&["region", "add", "s3r", "--location", "s3://bkt/shared"]);
    let sa = a.with(&["--region", "s3r"]);
    sa.ok(&["key", "create", "--alias", "k"]);
    let img = a.path("img.raw");
    write_pattern(&img, 6 << 20, 101);
    sa.ok(&[
        "import",
        img.to_str().unwrap(),
        "images/i",
        "--key",
        "alias/k",
    ]);
    let dek = sa.ok(&["dek", "images/i", "--reveal"]);

    // The records are in the bucket, not in the region's local directory.
    let object = s3.data.join("bkt/shared/keys/keystore.json");
    let text = std::fs::read_to_string(&object).unwrap();
    assert!(
        text.contains("alias/k") && text.contains("\"mac\""),
        "{text}"
    );
    assert!(!a.store.join("regions/s3r/keys/keystore.json").exists());

    // A second host, with the passphrase: the same keys, the same data key.
    let b = host(&s3);
    b.ok(&["region", "add", "s3r", "--location", "s3://bkt/shared"]);
    let sb = b.with(&["--region", "s3r"]);
    let listed = sb.json(&["key", "list", "--json"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["alias"] == "alias/k"),
        "{listed}"
    );
    assert_eq!(sb.ok(&["dek", "images/i", "--reveal"]), dek);

    // A disable on one host holds on the other.
    let before_disable = std::fs::read(&object).unwrap();
    sb.ok(&["key", "disable", "alias/k"]);
    sa.fail(&["dek", "images/i", "--reveal"], 6);

    // Enabled again in the bucket by hand: the tag no longer matches (exit 8).
    let disabled = std::fs::read_to_string(&object).unwrap();
    assert!(disabled.contains("Disabled"), "{disabled}");
    std::fs::write(&object, disabled.replacen("Disabled", "Enabled", 1)).unwrap();
    let msg = sa.fail(&["dek", "images/i", "--reveal"], 8);
    assert!(msg.contains("does not authenticate"), "{msg}");

    // The object from before the disable put back, authentic as it is: refused on both
    // hosts, which have seen a later one.
    std::fs::write(&object, &before_disable).unwrap();
    for s in [&sa, &sb] {
        let msg = s.fail(&["dek", "images/i", "--reveal"], 8);
        assert!(msg.contains("rolled back"), "{msg}");
    }
    std::fs::write(&object, disabled.as_bytes()).unwrap();
    sa.ok(&["key", "enable", "alias/k"]);
    assert_eq!(sb.ok(&["dek", "images/i", "--reveal"]), dek);

    // Two hosts update the key store at once: the one whose PUT comes second (held back
    // here by a relay in front of the server) was read before the other's write, and fails
    // as busy (exit 7) without undoing it. Without the condition it would put back the
    // key store it read, and the other's key would be lost. (s3s-fs checks the condition
    // apart from the write, so only an ordering like this one tests it reliably.)
    let hold = std::sync::Arc::new(Hold::default());
    let relay_port = relay(s3.port, Relay::HoldPuts(hold.clone()));
    let mut r = host(&s3);
    r.vars.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    r.vars.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{relay_port}"),
    ));
    r.ok(&["region", "add", "s3r", "--location", "s3://bkt/shared"]);
    let sr = r.with(&["--region", "s3r"]);
    use std::sync::atomic::Ordering::SeqCst;
    hold.on.store(true, SeqCst);
    let slow = std::thread::scope(|t| {
        let slow = t.spawn(|| sr.run(&["key", "create", "--alias", "slow"]));
        // Once its PUT is held (it has read the key store), the other host writes.
        let t0 = std::time::Instant::now();
        while hold.held.load(SeqCst) == 0 && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(hold.held.load(SeqCst), 1, "the slow host's PUT never came");
        sb.ok(&["key", "create", "--alias", "fast"]);
        hold.on.store(false, SeqCst);
        slow.join().unwrap()
    });
    check_failure(&["key"], &slow, 7);
    let aliases = sa.ok(&["key", "list"]);
    assert!(
        aliases.contains("alias/fast") && !aliases.contains("alias/slow"),
        "{aliases}"
    );
    sr.ok(&["key", "create", "--alias", "slow"]);
    assert!(sb.ok(&["key", "list"]).contains("alias/slow"));

    // A mount of the region: a disable on this host cuts its next open; one on the other
    // host within the key store's freshness (5 s).
    {
        use common::mount::*;
        let m = Mounted::new(&a, &["--region", "s3r"]);
        let want = std::fs::read(&img).unwrap();
        assert_eq!(std::fs::read(m.p("images/i")).unwrap(), want);
        sa.ok(&["key", "disable", "alias/k"]);
        let err = std::fs::read(m.p("images/i")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        sa.ok(&["key", "enable", "alias/k"]);
        assert_eq!(std::fs::read(m.p("images/i")).unwrap(), want);
        sb.ok(&["key", "disable", "alias/k"]);
        std::thread::sleep(Duration::from_millis(5500));
        let err = std::fs::read(m.p("images/i")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        sb.ok(&["key", "enable", "alias/k"]);
    }

    // A host without the passphrase, or without the root-key file of a region made with
    // one: one clear line, and no region.
    let mut c = Env::new();
    s3.env(&mut c);
    let msg = c.fail(
        &["region", "add", "s3r", "--location", "s3://bkt/shared"],
        6,
    );
    assert!(msg.contains("passphrase"), "{msg}");
    let mut d = Env::new();
    s3.env(&mut d);
    d.ok(&["region", "add", "filed", "--location", "s3://bkt/filed"]);
    let msg = c.fail(
        &["region", "add", "filed", "--location", "s3://bkt/filed"],
        6,
    );
    assert!(msg.contains("root key this host does not have"), "{msg}");
    assert_eq!(
        c.json(&["region", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // With the file copied, it opens.
    let from = d.store.join("regions/filed/keys/root.key");
    let to = c.store.join("regions/filed/keys/root.key");
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&from, &to).unwrap();
    c.ok(&["region", "add", "filed", "--location", "s3://bkt/filed"]);
    c.ok(&["--region", "filed", "key", "list"]);

    // A region made before its key store was an object (the file in the region's local
    // directory, nothing in the bucket): its next use makes the object of it.
    let fobj = s3.data.join("bkt/filed/keys/keystore.json");
    let local = back_to_a_local_file(&fobj, &d, "filed");
    d.ok(&["--region", "filed", "key", "create", "--alias", "m"]);
    assert!(!local.exists());
    assert!(std::fs::read_to_string(&fobj).unwrap().contains("alias/m"));

    // A region removed leaves a tombstone in its key store's place (the next host to make
    // the region writes over it); one from before, with a key in its local file, is not
    // removed.
    a.ok(&["region", "add", "gone", "--location", "s3://bkt/gone"]);
    let gone = s3.data.join("bkt/gone/keys/keystore.json");
    let made = std::fs::read(&gone).unwrap();
    a.ok(&["region", "remove", "gone"]);
    assert_eq!(std::fs::read(&gone).unwrap(), br#"{"removed": true}"#);
    assert!(a
        .fail(&["--region", "gone", "key", "list"], 2)
        .contains("unknown region"));
    a.ok(&["region", "add", "gone", "--location", "s3://bkt/gone"]);
    a.ok(&["--region", "gone", "key", "create", "--alias", "g"]);
    assert_ne!(std::fs::read(&gone).unwrap(), made);
    let legacy = back_to_a_local_file(&gone, &a, "gone");
    let msg = a.fail(&["region", "remove", "gone"], 5);
    assert!(msg.contains("holds 1 key(s)"), "{msg}");
    assert!(gone.exists() && !legacy.exists());
    assert!(object.exists());
}

/// Every change to an S3 region's key store is conditional on the ETag it was read at: a
/// server (or a proxy) that sends none is refused at `region add`, which leaves nothing in
/// the bucket or on the host, rather than a region whose keys can never change.
#[test]
fn a_server_without_etags_is_refused_when_the_region_is_added() {
    let Some(bin) = s3s_fs() else {
        return;
    };
    let a = Env::new();
    let s3 = S3::start(bin, a.path("s3"));
    let via = |port: u16| {
        let mut e = Env::new();
        s3.env(&mut e);
        e.vars.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
        e.vars.push((
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ));
        e
    };
    let bare = via(relay(s3.port, Relay::NoETags));
    let object = s3.data.join("bkt/t/keys/keystore.json");

    // A new region: refused, and the key store it made goes with the root key.
    let msg = bare.fail(&["region", "add", "s3r", "--location", "s3://bkt/t"], 5);
    assert!(msg.contains("sends no ETag"), "{msg}");
    assert!(!object.exists());
    assert!(!bare.store.join("regions/s3r").exists());
    assert_eq!(
        bare.json(&["region", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // One another host made through the server itself: joining it is refused, and it is
    // left as it was.
    let mut b = Env::new();
    s3.env(&mut b);
    b.ok(&["region", "add", "s3r", "--location", "s3://bkt/t"]);
    b.ok(&["--region", "s3r", "key", "create", "--alias", "k"]);
    let made = std::fs::read(&object).unwrap();
    std::fs::copy(b.store.join("regions/s3r/keys/root.key"), {
        let to = bare.store.join("regions/s3r/keys/root.key");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        to
    })
    .unwrap();
    let msg = bare.fail(&["region", "add", "s3r", "--location", "s3://bkt/t"], 5);
    assert!(msg.contains("sends no ETag"), "{msg}");
    assert_eq!(std::fs::read(&object).unwrap(), made);
    assert!(b
        .ok(&["--region", "s3r", "key", "list"])
        .contains("alias/k"));
}

/// A window a lookup made (by `stat`) and no open used is checked against the pointer once
/// it is older than a moment: another host's rekey since gave the disk a new version, which
/// no generation file on this host tells: a write went to the dropped version (EIO where
/// it had to read a dropped block first, lost where it did not).
#[test]
fn a_lookup_window_is_checked_after_another_host_rekeys() {
    use common::mount::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some(bin) = s3s_fs() else {
        return;
    };
    if !can_mount() {
        return;
    }
    let host = |s3: &S3| {
        let mut e = Env::new();
        s3.env(&mut e);
        e.vars
            .push(("ENCIMG_PASSPHRASE".into(), "two hosts".into()));
        e.ok(&["region", "add", "s3r", "--location", "s3://bkt/w"]);
        e
    };
    let first = Env::new();
    let s3 = S3::start(bin, first.path("s3"));
    let a = host(&s3);
    let raw = a.path("d.raw");
    write_pattern(&raw, 16 << 20, 7);
    a.ok(&[
        "--region",
        "s3r",
        "import",
        raw.to_str().unwrap(),
        "disks/d",
        "--encrypt",
    ]);
    let b = host(&s3);
    let m = Mounted::new(&a, &["--region", "s3r"]);
    assert_eq!(std::fs::metadata(m.p("disks/d")).unwrap().len(), 16 << 20);
    std::thread::sleep(Duration::from_millis(4500));
    b.ok(&["--region", "s3r", "key", "create", "--alias", "k2"]);
    b.ok(&[
        "--region",
        "s3r",
        "rekey",
        "disks/d",
        "--key",
        "alias/k2",
        "--reencrypt",
    ]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("disks/d"))
        .unwrap();
    let new = pattern(1 << 20, 8);
    f.write_all_at(&new, 2 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    let m = Mounted::new(&b, &["--region", "s3r"]);
    let mut back = vec![0u8; 1 << 20];
    std::fs::File::open(m.p("disks/d"))
        .unwrap()
        .read_exact_at(&mut back, 2 << 20)
        .unwrap();
    assert!(
        back == new,
        "the write through the other host's mount was lost"
    );
    m.umount();

    // Open on one host while the other rekeys it (no lock spans hosts): the next fsync
    // finds the pointer moved and fails, rather than report writes to a dropped version.
    let m = Mounted::new(&a, &["--region", "s3r"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("disks/d"))
        .unwrap();
    f.read_exact_at(&mut back, 2 << 20).unwrap();
    assert!(back == new);
    b.ok(&[
        "--region",
        "s3r",
        "rekey",
        "disks/d",
        "--key",
        "alias/k2",
        "--reencrypt",
    ]);
    f.write_all_at(&pattern(1 << 20, 9), 2 << 20).unwrap();
    let err = f.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(f);
    m.umount();
    let log = std::fs::read_to_string(a.store.join("regions/s3r/cache/mount.log")).unwrap();
    assert!(log.contains("given a new version meanwhile"), "{log}");
}

/// The key-store object gone, altered to cost a fortune to open, or beside a different
/// local key store from before: one clear line each, and nothing replaced or deleted.
#[test]
fn a_key_store_object_gone_altered_or_doubled_is_refused_not_replaced() {
    use common::mount::*;
    let Some(bin) = s3s_fs() else {
        return;
    };
    let host = |s3: &S3| {
        let mut e = Env::new();
        s3.env(&mut e);
        e.vars.push(("ENCIMG_PASSPHRASE".into(), "pw".into()));
        e.ok(&["region", "add", "s3r", "--location", "s3://bkt/q"]);
        e
    };
    let first = Env::new();
    let s3 = S3::start(bin, first.path("s3"));
    let a = host(&s3);
    let b = host(&s3);
    let sa = a.with(&["--region", "s3r"]);
    let sb = b.with(&["--region", "s3r"]);
    sa.ok(&["key", "create", "--alias", "k"]);
    let img = a.path("img.raw");
    write_pattern(&img, 4 << 20, 5);
    sa.ok(&[
        "import",
        img.to_str().unwrap(),
        "images/i",
        "--key",
        "alias/k",
    ]);
    let object = s3.data.join("bkt/q/keys/keystore.json");
    let good = std::fs::read(&object).unwrap();

    // Costs out of range in the (authenticated, but read first) derivation parameters.
    let text = String::from_utf8(good.clone()).unwrap();
    for (from, to) in [
        ("65536", "4294967295"),
        ("\\\"t_cost\\\": 3", "\\\"t_cost\\\": 200000"),
    ] {
        assert!(text.contains(from), "{from} in {text}");
        std::fs::write(&object, text.replacen(from, to, 1)).unwrap();
        let o = a.run_within(&["--region", "s3r", "key", "list"], 20);
        let msg = check_failure(&["key"], &o, 8);
        assert!(msg.contains("out of range"), "{msg}");
    }
    std::fs::write(&object, &good).unwrap();

    // A mount holding the image open: a forged or rolled-back key store does not let a
    // second open through once the mount reads it again.
    if can_mount() {
        let m = Mounted::new(&a, &["--region", "s3r"]);
        let held = std::fs::File::open(m.p("images/i")).unwrap();
        sa.ok(&["key", "disable", "alias/k"]);
        let err = std::fs::File::open(m.p("images/i")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        std::fs::write(&object, &good).unwrap();
        std::thread::sleep(Duration::from_millis(5500));
        let err = std::fs::File::open(m.p("images/i")).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::EACCES | libc::EIO)),
            "{err}"
        );
        drop(held);
        m.umount();
    }

    // Gone from the bucket (removed on the other host, or deleted): every command says so,
    // and none makes an empty key store in its place.
    let saved = s3.data.join("saved.json");
    std::fs::copy(&object, &saved).unwrap();
    std::fs::remove_file(&object).unwrap();
    for args in [
        &["dek", "images/i", "--reveal"][..],
        &["key", "list"],
        &["key", "create", "--alias", "x"],
    ] {
        let msg = sa.fail(args, 8);
        assert!(msg.contains("is gone"), "{args:?}: {msg}");
        assert!(!object.exists(), "{args:?} made a key store");
    }
    // A new host adding the region while its resources have no key store: refused, and no
    // empty key store made for them.
    let c = Env::new();
    let mut c = c;
    s3.env(&mut c);
    c.vars.push(("ENCIMG_PASSPHRASE".into(), "pw".into()));
    let msg = c.fail(&["region", "add", "s3r", "--location", "s3://bkt/q"], 5);
    assert!(msg.contains("holds resources but no key store"), "{msg}");
    assert!(!object.exists());
    std::fs::copy(&saved, &object).unwrap();

    // A host with a local key store from before, different from the bucket's: refused, and
    // its file kept.
    let local = b.store.join("regions/s3r/keys/keystore.json");
    std::fs::write(
        &local,
        br#"{"format": 1, "root": {"type": "file"}, "keys": []}"#,
    )
    .unwrap();
    let msg = sb.fail(&["key", "list"], 5);
    assert!(msg.contains("neither is used"), "{msg}");
    assert!(local.exists());
    // The same records as the bucket's (a move to the bucket cut short before the file
    // went): the file goes, and the bucket's are used.
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&object).unwrap()).unwrap();
    std::fs::write(&local, envelope["keystore"].as_str().unwrap()).unwrap();
    sb.ok(&["key", "list"]);
    assert!(!local.exists());

    // A key store this host cannot take (here rolled back; also one made again by another
    // host): removing the region forgets it here and touches nothing in the bucket.
    sa.ok(&["delete", "images/i"]);
    std::fs::write(&object, &good).unwrap();
    sa.fail(&["key", "list"], 8);
    sa.ok(&["region", "remove", "s3r"]);
    assert_eq!(std::fs::read(&object).unwrap(), good);
    // Removed on one host: the other is not stuck with it.
    std::fs::remove_file(&object).unwrap();
    sb.ok(&["region", "remove", "s3r"]);
    assert_eq!(
        b.json(&["region", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
