//! Fitting in on a Linux dev host (SPEC §11): an ordinary user's mount through fusermount3
//! (and one clear line where the host forbids it), sparse disks that look sparse to `du`,
//! `qemu-img` and `SEEK_DATA`, man pages and completions from the clap definitions, and the
//! environment as users set it.
//!
//! The non-root tests need root (to make the user's directories and a private mount
//! namespace), `unshare`, `setpriv` and fusermount3; CI has them.

mod common;
use common::mount::*;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A directory user `nobody` owns, under a temp dir it can reach.
fn nobody_dir(e: &Env) -> std::path::PathBuf {
    std::fs::set_permissions(e.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
    let d = e.path("u");
    std::fs::create_dir_all(&d).unwrap();
    sh(&format!("chown 65534:65534 {}", d.display()));
    d
}

/// Run `script` (sh) in a private mount namespace in which `/dev/fuse` is a device node of
/// mode `mode`, the commands of `user_script` as user nobody; returns (success, stdout+err).
fn in_namespace(e: &Env, mode: &str, user_script: &str) -> (bool, String) {
    let node = e.path("fuse-node");
    let _ = std::fs::remove_file(&node);
    let script = format!(
        "set -e; mknod {node} c 10 229; chmod {mode} {node}; mount --bind {node} /dev/fuse; \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups env LC_ALL=C sh -c '{user_script}'",
        node = node.display()
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn an_ordinary_user_mounts_writes_reads_and_unmounts() {
    if !is_root() || !have("unshare") || !have("setpriv") || !have("fusermount3") {
        eprintln!("SKIPPED: needs root, unshare, setpriv and fusermount3");
        return;
    }
    let e = Env::bare();
    let u = nobody_dir(&e);
    let bin = env!("CARGO_BIN_EXE_encimg");
    let data = u.join("data");
    // Everything the user does, in one script: a store, a disk, a mount, a write through
    // it, a read back, the mount's owner, an unmount.
    let script = format!(
        "export HOME={u} ENCIMG_STORE={u}/store; \
         {bin} init >/dev/null && {bin} create disks/d --size 8M --encrypt >/dev/null && \
         mkdir -p {u}/mnt && {bin} mount {u}/mnt && \
         head -c 1048576 /dev/urandom > {data} && \
         dd if={data} of={u}/mnt/disks/d bs=64k seek=3 conv=notrunc,fsync 2>/dev/null && \
         dd if={u}/mnt/disks/d bs=64k skip=3 count=16 2>/dev/null | cmp - {data} && \
         grep \" {u}/mnt fuse.encimg \" /proc/self/mounts && \
         {bin} umount {u}/mnt && ! grep -q \" {u}/mnt \" /proc/self/mounts && echo ALL-GOOD",
        u = u.display(),
        data = data.display()
    );
    let (ok, out) = in_namespace(&e, "0666", &script);
    assert!(ok && out.contains("ALL-GOOD"), "{out}");
    assert!(out.contains("user_id=65534"), "not the user's mount: {out}");
    // The data is in the store, encrypted, readable by the library as written.
    let s = encimg::store::Store::at(&u.join("store"), "local");
    let v = s
        .open_volume(&encimg::store::ResPath::parse("disks/d").unwrap(), false)
        .unwrap();
    let mut back = vec![0u8; 1 << 20];
    v.read_at(&mut back, 3 * 65536).unwrap();
    assert!(back == std::fs::read(&data).unwrap());
}

/// Without `XDG_RUNTIME_DIR` (`su`, cron), a user's pid files go to `$TMPDIR/encimg-UID`.
/// Another user who made that directory first (open to all) must not get the pid file, which
/// they could swap so `umount` waits for the wrong process: the mount works without it, says
/// why in its log, and unmounts.
#[test]
fn a_runtime_directory_another_user_made_first_is_not_used() {
    if !is_root() || !have("unshare") || !have("setpriv") || !have("fusermount3") {
        eprintln!("SKIPPED: needs root, unshare, setpriv and fusermount3");
        return;
    }
    let e = Env::bare();
    let u = nobody_dir(&e);
    let tmp = u.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Made first by someone else (root here), open to all.
    let squat = tmp.join("encimg-65534");
    std::fs::create_dir(&squat).unwrap();
    std::fs::set_permissions(&squat, std::fs::Permissions::from_mode(0o777)).unwrap();
    let bin = env!("CARGO_BIN_EXE_encimg");
    let script = format!(
        "unset XDG_RUNTIME_DIR; export HOME={u} TMPDIR={tmp} ENCIMG_STORE={u}/store; \
         {bin} init >/dev/null && {bin} create disks/d --size 8M --encrypt >/dev/null && \
         mkdir -p {u}/mnt && {bin} mount {u}/mnt && \
         echo IN-SQUAT: $(ls -A {squat}) && \
         {bin} umount {u}/mnt && ! grep -q \" {u}/mnt \" /proc/self/mounts && echo ALL-GOOD",
        u = u.display(),
        tmp = tmp.display(),
        squat = squat.display()
    );
    let (ok, out) = in_namespace(&e, "0666", &script);
    assert!(ok && out.contains("ALL-GOOD"), "{out}");
    assert!(
        out.contains("IN-SQUAT:\n"),
        "a pid file went into the other user's directory: {out}"
    );
    let log = std::fs::read_to_string(u.join("store/mount.log")).unwrap();
    assert!(
        log.contains("not private"),
        "the log does not say why: {log}"
    );
}

#[test]
fn a_host_that_closes_dev_fuse_gets_one_line_saying_what_to_change() {
    if !is_root() || !have("unshare") || !have("setpriv") || !have("fusermount3") {
        eprintln!("SKIPPED: needs root, unshare, setpriv and fusermount3");
        return;
    }
    let e = Env::bare();
    let u = nobody_dir(&e);
    let bin = env!("CARGO_BIN_EXE_encimg");
    let script = format!(
        "export HOME={u} ENCIMG_STORE={u}/store; {bin} init >/dev/null; mkdir -p {u}/mnt; \
         {bin} mount {u}/mnt; echo EXIT=$?",
        u = u.display()
    );
    let (_, out) = in_namespace(&e, "0600", &script);
    let line = out
        .lines()
        .find(|l| l.starts_with("encimg: error:"))
        .unwrap_or_else(|| panic!("no error line: {out}"));
    assert!(out.contains("EXIT=5"), "{out}");
    assert!(
        line.contains("/dev/fuse") && line.contains("chmod 0666 /dev/fuse"),
        "{line}"
    );
    assert_eq!(out.matches("encimg: error:").count(), 1, "{out}");
}

#[test]
fn sparse_disks_look_sparse_to_du_qemu_img_and_seek_data() {
    if !can_mount_with("qemu-img") {
        return;
    }
    let e = Env::new();
    e.ok(&["create", "disks/big", "--size", "10G", "--encrypt"]);
    e.ok(&["create", "disks/plain", "--size", "1G"]);
    let m = Mounted::new(&e, &[]);
    let du = |p: &Path| -> u64 {
        sh(&format!("du -k {}", p.display()))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(du(&m.p("disks/big")) < 64, "a blank 10 GiB disk looks used");
    assert!(du(&m.p("disks/plain")) < 64);
    let info = sh(&format!(
        "qemu-img info --output=json {}",
        m.p("disks/big").display()
    ));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 10u64 << 30);
    assert!(v["actual-size"].as_u64().unwrap() < 64 << 10, "{info}");
    // 8 MiB written at 100 MiB: du sees 8 MiB, SEEK_DATA/SEEK_HOLE find exactly it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("disks/big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(8 << 20, 1), 100 << 20).unwrap();
    f.sync_all().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // attribute cache
    let k = du(&m.p("disks/big"));
    assert!(
        (8 << 10..9 << 10).contains(&k),
        "du says {k} KiB for 8 MiB written"
    );
    use std::os::fd::AsRawFd;
    let seek = |off: i64, whence| {
        // SAFETY: lseek on a descriptor the test owns.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(r as u64)
        }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(100 << 20));
    assert_eq!(seek(100 << 20, libc::SEEK_HOLE), Ok(108 << 20));
    assert_eq!(seek(108 << 20, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek((10 << 30) - 1, libc::SEEK_HOLE), Ok((10 << 30) - 1));
    // qemu-img map follows the holes too.
    let map = sh(&format!(
        "qemu-img map --output=json {}",
        m.p("disks/big").display()
    ));
    let spans: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<_> = spans.iter().filter(|s| s["data"] == true).collect();
    assert_eq!(data.len(), 1, "{map}");
    assert_eq!(data[0]["start"], 100u64 << 20);
    assert_eq!(data[0]["length"], 8u64 << 20);
    drop(f);
    m.umount();
}

#[test]
fn man_pages_and_completions_come_from_the_argument_definitions() {
    let e = Env::bare();
    let dir = e.path("man");
    e.ok(&["man", "--dir", dir.to_str().unwrap()]);
    // Every visible subcommand (and sub-subcommand) has a page.
    for p in [
        "encimg",
        "encimg-copy",
        "encimg-key",
        "encimg-key-create",
        "encimg-region-add",
        "encimg-mount",
        "encimg-import",
        "encimg-completions",
    ] {
        let page = std::fs::read_to_string(dir.join(format!("{p}.1"))).unwrap();
        assert!(page.contains(".TH"), "{p}");
    }
    let copy = std::fs::read_to_string(dir.join("encimg-copy.1")).unwrap();
    assert!(
        copy.contains("to\\-region"),
        "copy's page lacks --to-region"
    );
    if have("man") {
        let o = Command::new("man")
            .arg("-l")
            .arg(dir.join("encimg-copy.1"))
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).contains("--to-region"));
    }
    let bash = e.ok(&["completions", "bash"]);
    assert!(
        bash.contains("region") && bash.contains("--to-region"),
        "bash"
    );
    let f = e.path("c.bash");
    std::fs::write(&f, &bash).unwrap();
    sh(&format!("bash -n {}", f.display()));
    assert!(e.ok(&["completions", "zsh"]).contains("#compdef encimg"));
    assert!(e
        .ok(&["completions", "fish"])
        .contains("complete -c encimg"));
    e.fail(&["completions", "tcsh"], 2);
}

#[test]
fn an_empty_encimg_store_means_the_default_store() {
    let e = Env::bare();
    let home = e.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_encimg"))
        .env("HOME", &home)
        .env_remove("XDG_DATA_HOME")
        .env("ENCIMG_STORE", "")
        .env("ENCIMG_REGION", "")
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(home.join(".local/share/encimg/keys/keystore.json").exists());
}

/// qemu's format name for the test images below.
fn qemu_format(name: &str) -> &'static str {
    match name {
        "qcow2" | "qcow2c" => "qcow2",
        "vmdk" | "vmdkso" => "vmdk",
        "vhd" | "vhdfixed" => "vpc",
        _ => "vhdx",
    }
}

/// qemu-img, run for the test (the oracle); panics with its error.
fn qemu_img(args: &str) -> String {
    sh(&format!("qemu-img {args}"))
}

#[test]
fn qcow2_vmdk_vhd_and_vhdx_import_as_qemu_reads_them_and_qcow2_exports() {
    if !have("qemu-img") || !have("qemu-nbd") {
        eprintln!("SKIPPED: needs qemu-img and qemu-nbd (qemu-utils)");
        return;
    }
    let e = Env::new();
    let base = e.path("base.raw");
    // 64 MiB: data at the start, a hole, data at 40 MiB, a hole to the end.
    let mut data = vec![0u8; 64 << 20];
    data[..3 << 20].copy_from_slice(&pattern(3 << 20, 1));
    data[40 << 20..42 << 20].copy_from_slice(&pattern(2 << 20, 2));
    std::fs::write(&base, &data).unwrap();
    sh(&format!("fallocate --dig-holes {}", base.display()));
    let b = base.display();
    let images = [
        ("qcow2", "-O qcow2"),
        ("qcow2c", "-c -O qcow2"),
        ("vmdk", "-O vmdk"),
        ("vmdkso", "-O vmdk -o subformat=streamOptimized"),
        ("vhd", "-O vpc"),
        ("vhdfixed", "-O vpc -o subformat=fixed"),
        ("vhdx", "-O vhdx"),
    ];
    for (name, how) in &images {
        // Named .img: the format is told by content, not by name.
        let img = e.path(&format!("{name}.img"));
        qemu_img(&format!("convert -f raw {how} {b} {}", img.display()));
        for (res, extra) in [
            (format!("images/{name}"), "--encrypt"),
            (format!("images/{name}-plain"), ""),
        ] {
            let mut args = vec!["import", img.to_str().unwrap(), res.as_str()];
            if !extra.is_empty() {
                args.push(extra);
            }
            e.ok(&args);
            // The oracle: qemu's own reading of the image.
            let oracle = e.path(&format!("{name}.oracle"));
            let _ = std::fs::remove_file(&oracle);
            let fmt = qemu_format(name);
            qemu_img(&format!(
                "convert -f {fmt} -O raw {} {}",
                img.display(),
                oracle.display()
            ));
            let want = std::fs::read(&oracle).unwrap();
            assert!(
                read_plain(&e.store, &res) == want,
                "{res}: plaintext differs from qemu's"
            );
            let i = e.info(&res);
            assert_eq!(i["size"], want.len() as u64, "{res}");
            // Holes stay holes: 5 MiB of data takes well under the 64 MiB.
            assert!(
                i["allocated"].as_u64().unwrap() < (16 << 20),
                "{res}: {} bytes allocated",
                i["allocated"]
            );
        }
    }
    // qemu-img compare through the mount, against the source image itself.
    if can_mount() {
        let m = Mounted::new(&e, &[]);
        for (name, _) in &images {
            let img = e.path(&format!("{name}.img"));
            qemu_img(&format!(
                "compare -f raw -F {} {} {}",
                qemu_format(name),
                m.p(&format!("images/{name}")).display(),
                img.display()
            ));
        }
        m.umount();
    }
    // Images that pull in other files are refused, saying how to flatten them.
    let q = e.path("qcow2.img");
    let child = e.path("child.img");
    qemu_img(&format!(
        "create -q -f qcow2 -b {} -F qcow2 {}",
        q.display(),
        child.display()
    ));
    let err = e.fail(&["import", child.to_str().unwrap(), "images/child"], 5);
    assert!(
        err.contains("backing file") && err.contains("qemu-img convert"),
        "{err}"
    );
    let split = e.path("split.vmdk");
    qemu_img(&format!(
        "convert -f raw -O vmdk -o subformat=twoGbMaxExtentSparse {b} {}",
        split.display()
    ));
    let err = e.fail(&["import", split.to_str().unwrap(), "images/split"], 5);
    assert!(err.contains("extent files"), "{err}");
    // Nothing left running or lying around.
    let left = Command::new("pgrep")
        .args(["-f", "qemu-nbd --read-only"])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "qemu-nbd left running");
    assert!(std::fs::read_dir(e.store.join("tmp"))
        .unwrap()
        .next()
        .is_none());

    // export --format qcow2 of an unencrypted resource: qemu-img agrees, 0600, checked.
    let out = e.path("out.qcow2");
    e.ok(&[
        "export",
        "images/qcow2-plain",
        out.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    qemu_img(&format!("compare -f raw -F qcow2 {b} {}", out.display()));
    qemu_img(&format!("check {}", out.display()));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
    e.fail(
        &[
            "export",
            "images/qcow2-plain",
            out.to_str().unwrap(),
            "--format",
            "qcow2",
        ],
        4,
    );
    e.fail(
        &[
            "export",
            "images/qcow2",
            e.path("x.qcow2").to_str().unwrap(),
            "--format",
            "qcow2",
        ],
        5,
    );
    e.fail(
        &[
            "export",
            "images/qcow2-plain",
            e.path("x.vdi").to_str().unwrap(),
            "--format",
            "vdi",
        ],
        2,
    );
}

/// `contrib/test.sh` ends with one line: the overall result and the counts summed over every
/// test binary, naming failed tests; a build failure says so instead of "0 passed".
#[test]
fn the_test_command_ends_with_one_summary_line() {
    let e = Env::bare();
    let summary = |log: &str, status: i32| {
        let p = e.path("log");
        std::fs::write(&p, log).unwrap();
        let o = std::process::Command::new("awk")
            .args(["-v", &format!("status={status}"), "-v", "secs=42", "-f"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/test-summary.awk"))
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success());
        let out = String::from_utf8(o.stdout).unwrap();
        assert_eq!(out.trim_start().lines().count(), 1, "{out}");
        out.trim().to_string()
    };
    let ok = "running 2 tests\ntest a ... ok\ntest b ... ok\n\
              test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s\n\
              Testing xts/aes\nSuccess\n\
              test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.0s\n\
              Run status group 0 (all jobs):\n";
    assert_eq!(
        summary(ok, 0),
        "encimg test suite: PASSED: 7 passed, 0 failed, 1 ignored in 2 test binaries (42 s)"
    );
    let bad = "test mount::a ... ok\ntest mount::b ... FAILED\n\
               test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n\
               test c ... FAILED\n\
               test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n";
    assert_eq!(
        summary(bad, 101),
        "encimg test suite: FAILED: 4 passed, 2 failed, 0 ignored in 2 test binaries (42 s); failed: mount::b c"
    );
    assert_eq!(
        summary("error[E0425]: cannot find value `x`\n", 101),
        "encimg test suite: FAILED before any test ran (build error above; exit 101)"
    );
}

/// Peak RSS (KiB) of `cmd` and what it waited for, and its output.
// The child is reaped by wait4 (for its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_measured(mut cmd: Command) -> (std::process::Output, i64) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let out = std::thread::spawn(move || {
        use std::io::Read;
        let (mut o, mut e) = (child.stdout.unwrap(), child.stderr.unwrap());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let t = std::thread::spawn(move || {
            let _ = e.read_to_end(&mut b);
            b
        });
        let _ = o.read_to_end(&mut a);
        (a, t.join().unwrap())
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both out-pointers are ours.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    let (stdout, stderr) = out.join().unwrap();
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    (
        std::process::Output {
            status,
            stdout,
            stderr,
        },
        ru.ru_maxrss,
    )
}

/// Images a guest or an attacker made: a raw disk whose first sector holds a qcow2 header
/// (`--format raw` takes it as the raw disk it is; without it, the import says what it read
/// it as), a file whose name qemu would parse (`file:…`), a store deep enough that a socket
/// path in it is too long, and a small qcow2 whose map lists a million ranges (its import
/// took gigabytes).
#[test]
fn imports_read_what_was_named_as_it_was_named_in_bounded_memory() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("qemu-io") {
        eprintln!("SKIPPED: needs qemu-img, qemu-io and qemu-nbd (qemu-utils)");
        return;
    }
    let e = Env::new();
    let d = |n: &str| e.path(n).display().to_string();
    let m = Mounted::new(&e, &[]);

    // A raw disk whose guest wrote a qcow2 image at its start.
    qemu_img(&format!("create -q -f qcow2 {} 4M", d("inner.qcow2")));
    sh(&format!(
        "qemu-io -c 'write -P 0x5a 0 1M' {} >/dev/null",
        d("inner.qcow2")
    ));
    let mut raw = std::fs::read(e.path("inner.qcow2")).unwrap();
    raw.resize(8 << 20, 0);
    raw[(6 << 20)..(7 << 20)].copy_from_slice(&pattern(1 << 20, 5));
    std::fs::write(e.path("guest.raw"), &raw).unwrap();
    e.ok(&["import", &d("guest.raw"), "images/asis", "--format", "raw"]);
    assert!(std::fs::read(m.p("images/asis")).unwrap() == raw);
    let o = e.run(&["import", &d("guest.raw"), "images/probed"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("read as a qcow2 image") && err.contains("--format raw"),
        "{err}"
    );
    e.fail(
        &["import", &d("guest.raw"), "images/x", "--format", "vhd"],
        8,
    );

    // A file named like a qemu protocol: its own content, not a.qcow2's.
    qemu_img(&format!("create -q -f qcow2 {} 1M", d("file:a.qcow2")));
    qemu_img(&format!("create -q -f qcow2 {} 2M", d("a.qcow2")));
    let here = e.path("");
    let o = e
        .cmd()
        .current_dir(&here)
        .args(["import", "file:a.qcow2", "images/colon"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(m.p("images/colon")).unwrap().len(),
        1 << 20
    );
    drop(m);

    // A store deeper than a Unix socket's path allows.
    let deep = e.path(&format!("{}/store", "d".repeat(90)));
    let o = e
        .cmd()
        .args(["--store", deep.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = e
        .cmd()
        .args([
            "--store",
            deep.to_str().unwrap(),
            "import",
            &d("a.qcow2"),
            "images/a",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // 128 L2 tables of "zero cluster, unallocated" in turn: 1M ranges qemu cannot join,
    // from a 9 MB file, over 64 GiB that read as zeros.
    let bomb = e.path("bomb.qcow2");
    let (tables, cs, per) = (128u64, 65536u64, 8192u64);
    qemu_img(&format!(
        "create -q -f qcow2 -o cluster_size=65536 {} {}",
        bomb.display(),
        tables * per * cs
    ));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bomb)
            .unwrap();
        let mut h = [0u8; 48];
        f.read_exact_at(&mut h, 0).unwrap();
        let l1_off = u64::from_be_bytes(h[40..48].try_into().unwrap());
        let end = f.metadata().unwrap().len().div_ceil(cs) * cs;
        let (zero_cluster, l2_base) = (end, end + cs);
        f.write_all_at(&vec![0u8; cs as usize], zero_cluster)
            .unwrap();
        let mut l2 = Vec::with_capacity(cs as usize);
        for _ in 0..per / 2 {
            l2.extend_from_slice(&(zero_cluster | 1 | 1 << 63).to_be_bytes());
            l2.extend_from_slice(&[0u8; 8]);
        }
        let mut l1 = Vec::new();
        for i in 0..tables {
            f.write_all_at(&l2, l2_base + i * cs).unwrap();
            l1.extend_from_slice(&((l2_base + i * cs) | 1 << 63).to_be_bytes());
        }
        f.write_all_at(&l1, l1_off).unwrap();
    }
    let mut cmd = e.cmd();
    cmd.args(["import", bomb.to_str().unwrap(), "images/bomb", "--encrypt"]);
    let (o, peak_kib) = run_measured(cmd);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        peak_kib < 256 << 10,
        "the import peaked at {} MiB",
        peak_kib >> 10
    );
    assert_eq!(e.info("images/bomb")["size"], tables * per * cs);
}
