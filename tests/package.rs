//! The Debian package, installed as a user installs it: `dpkg -i` of the `.deb` that
//! `contrib/deb.sh` built (`contrib/test.sh` builds it and names it in `ENCIMG_DEB`), then
//! `man encimg`, the completions, a mount through mount(8) and the installed
//! `mount.fuse.encimg` (also from an fstab line), the installed systemd service run the way
//! systemd runs a `Type=notify` unit, and `dpkg --purge` leaving nothing behind.
//!
//! Needs root (it installs the package system-wide, then purges it), /dev/fuse and
//! fusermount3; skipped where `ENCIMG_DEB` is unset or encimg is already installed from
//! elsewhere (it is never replaced). CI runs it through `bash contrib/test.sh`.

mod common;
use common::mount::*;
use common::*;

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &str) -> (bool, String) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

/// The package installed for the test's life; purged (and checked gone) on drop.
struct Installed;

impl Installed {
    fn new(deb: &str) -> Installed {
        sh(&format!("dpkg -i {deb}"));
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "encimg"]).status();
    }
}

/// Unmounts (lazily) whatever is still mounted at `.0` when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.0)
                .status();
        }
    }
}

fn wait_unmounted(p: &Path) {
    let t = Instant::now();
    while is_mounted(p) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} stays mounted",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The package to test, or None (with the reason printed) where this test cannot run.
fn package() -> Option<String> {
    if !can_mount() {
        return None;
    }
    let Ok(deb) = std::env::var("ENCIMG_DEB") else {
        eprintln!(
            "SKIPPED: ENCIMG_DEB is unset (bash contrib/test.sh builds the package and sets it)"
        );
        return None;
    };
    assert!(Path::new(&deb).is_file(), "ENCIMG_DEB={deb} is not a file");
    if run("dpkg -s encimg").0 {
        eprintln!("SKIPPED: encimg is installed on this host already; the test never replaces it");
        return None;
    }
    Some(deb)
}

#[test]
fn the_debian_package_installs_man_pages_completions_the_mount_helper_and_the_service() {
    let Some(deb) = package() else { return };
    let e = Env::bare();
    let guard = Installed::new(&deb);

    // The binary, on PATH where Debian puts it.
    assert_eq!(sh("command -v encimg").trim(), "/usr/bin/encimg");
    assert!(sh("encimg --version").starts_with("encimg "));

    // Man pages: `man encimg` and one page per subcommand.
    assert_eq!(
        sh("man -w encimg").trim(),
        "/usr/share/man/man1/encimg.1.gz"
    );
    let page = sh("MANPAGER=cat MANWIDTH=100 man encimg 2>/dev/null");
    assert!(page.contains("encimg-mount(1)"), "{page}");
    assert!(page.contains("encimg-key(1)"), "{page}");
    let mount_page = sh("MANPAGER=cat MANWIDTH=100 man encimg-mount 2>/dev/null");
    assert!(mount_page.contains("--allow-other"), "{mount_page}");

    // Completions, where each shell looks for them; bash's completes for real.
    let words = sh(
        "bash -c '. /usr/share/bash-completion/completions/encimg && \
         COMP_WORDS=(encimg ke) COMP_CWORD=1 COMP_LINE=\"encimg ke\" COMP_POINT=9 && \
         _encimg encimg ke encimg && echo \"${COMPREPLY[@]}\"'",
    );
    assert_eq!(words.trim(), "key", "bash completion of `encimg ke`");
    let zsh = std::fs::read_to_string("/usr/share/zsh/vendor-completions/_encimg").unwrap();
    assert!(zsh.starts_with("#compdef encimg"), "{}", &zsh[..40]);
    let fish = std::fs::read_to_string("/usr/share/fish/vendor_completions.d/encimg.fish").unwrap();
    assert!(fish.contains("complete -c encimg"));

    // The units are ones systemd accepts as they are (any warning fails).
    for unit in [
        "/lib/systemd/system/encimg.service",
        "/lib/systemd/system/encimg-serve.service",
        "/usr/share/doc/encimg/examples/mnt-encimg.mount",
    ] {
        let (ok, out) = run(&format!("systemd-analyze verify {unit}"));
        assert!(
            ok && out.trim().is_empty(),
            "systemd-analyze verify {unit}: {out}"
        );
    }

    // A store made by the installed binary, mounted by mount(8) through the installed helper.
    let store = e.path("store");
    let mnt = e.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let _unmount = Unmount(mnt.clone());
    sh(&format!(
        "encimg --store {s} init && encimg --store {s} create disks/d --size 8M --encrypt",
        s = store.display()
    ));
    let data = pattern(1 << 20, 7);
    std::fs::write(e.path("data"), &data).unwrap();
    sh(&format!(
        "mount -t fuse.encimg {} {} -o cache_size=64M",
        store.display(),
        mnt.display()
    ));
    assert!(is_mounted(&mnt));
    sh(&format!(
        "dd if={} of={}/disks/d bs=64k conv=notrunc,fsync status=none",
        e.path("data").display(),
        mnt.display()
    ));
    sh(&format!("umount {}", mnt.display()));
    wait_unmounted(&mnt);

    // Again from an fstab line (the example's form), read-only: the data is there, writes fail.
    let fstab = e.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.encimg ro,noauto,nofail,cache_size=32M 0 0\n",
            store.display(),
            mnt.display()
        ),
    )
    .unwrap();
    sh(&format!(
        "mount --fstab {} {}",
        fstab.display(),
        mnt.display()
    ));
    assert!(is_mounted(&mnt));
    sh(&format!(
        "cmp -n {} {} {}/disks/d",
        data.len(),
        e.path("data").display(),
        mnt.display()
    ));
    let (ok, out) = run(&format!(
        "dd if=/dev/zero of={}/disks/d bs=4k count=1 conv=notrunc status=none",
        mnt.display()
    ));
    assert!(!ok && out.contains("Read-only file system"), "{out}");
    // A mistyped option is an error, not silently ignored.
    let (ok, out) = run(&format!(
        "mount -t fuse.encimg {} {} -o cache_sise=1G",
        store.display(),
        e.path("other").display()
    ));
    assert!(
        !ok && out.contains("unknown option: cache_sise=1G"),
        "{out}"
    );
    sh(&format!("umount {}", mnt.display()));
    wait_unmounted(&mnt);

    // The installed service, run as systemd runs it: its Environment, its ExecStartPre and
    // ExecStart lines (with the store and /run/encimg moved into the test's directory), a
    // notify socket that must get READY=1 once the mount is live, and SIGTERM to stop.
    service_runs_as_systemd_would(&e);

    drop(guard);
    // Purged: nothing of the package left.
    assert!(!run("dpkg -s encimg").0, "still installed after purge");
    for p in [
        "/usr/bin/encimg",
        "/sbin/mount.fuse.encimg",
        "/lib/systemd/system/encimg.service",
        "/usr/share/man/man1/encimg.1.gz",
    ] {
        assert!(!Path::new(p).exists(), "{p} left behind");
    }
}

fn service_runs_as_systemd_would(e: &Env) {
    let unit = std::fs::read_to_string("/lib/systemd/system/encimg.service").unwrap();
    let mnt = e.path("run-encimg");
    let fresh_store = e.path("var-lib-encimg");
    let subst = |s: &str| {
        s.replace("/var/lib/encimg", fresh_store.to_str().unwrap())
            .replace("/run/encimg", mnt.to_str().unwrap())
    };
    let mut envs = Vec::new();
    let mut pre = Vec::new();
    let mut start = None;
    let mut in_service = false;
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service {
            continue;
        }
        if let Some(v) = line.strip_prefix("Environment=") {
            let (k, v) = v.split_once('=').unwrap();
            envs.push((k.to_string(), subst(v)));
        } else if let Some(v) = line.strip_prefix("ExecStartPre=") {
            pre.push(subst(v));
        } else if let Some(v) = line.strip_prefix("ExecStart=") {
            start = Some(subst(v));
        }
    }
    assert!(
        unit.contains("\nType=notify\n"),
        "the service is Type=notify"
    );
    assert!(unit.contains("\nRuntimeDirectory=encimg\n"));
    let start = start.expect("ExecStart");
    assert!(envs.iter().any(|(k, _)| k == "ENCIMG_STORE"));
    // systemd: StateDirectory (0700) and RuntimeDirectory exist before ExecStartPre.
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&fresh_store)
        .unwrap();
    let _unmount = Unmount(mnt.clone());
    let cmd = |line: &str| {
        let mut words = line.split_whitespace();
        let mut c = Command::new(words.next().unwrap());
        c.args(words)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in &envs {
            c.env(k, v);
        }
        c
    };
    for line in &pre {
        let o = cmd(line).output().unwrap();
        assert!(o.status.success(), "{line}: {o:?}");
    }
    let sock_path = e.path("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = cmd(&start)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("READY=1 from the service within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    // READY means live: the mount is there and serves the store the service made.
    assert!(is_mounted(&mnt), "READY=1 before the mount was live");
    assert!(mnt.join("disks").is_dir());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("allow_other"), "{line}");
    assert!(
        fresh_store.join("keys").is_dir(),
        "ExecStartPre initialized the store"
    );
    // `systemctl stop`: SIGTERM; the service says STOPPING=1, unmounts and exits 0.
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the service");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "the service exited {status:?}");
    assert!(!is_mounted(&mnt));
}
