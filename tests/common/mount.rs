//! Real-mount helpers: whether mounts can run here, a mounted store that cleans up after
//! itself, control-file writes, and running a command as another user.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Env;

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// True when real mounts can run here; otherwise prints why and the test returns early.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists() && have("fusermount3");
    if !ok {
        eprintln!("SKIPPED: real-mount test needs root, /dev/fuse and fusermount3 (CI has them)");
    }
    ok
}

/// True when real mounts can run here and `tool` is installed; otherwise prints why.
pub fn can_mount_with(tool: &str) -> bool {
    if !can_mount() {
        return false;
    }
    let ok = have(tool);
    if !ok {
        eprintln!("SKIPPED: needs {tool}");
    }
    ok
}

pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Whether `p` is a mountpoint. Read as bytes, with the kernel's octal escapes: another
/// test's mountpoint may have any bytes in its name.
pub fn is_mounted(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let mut want = Vec::new();
    for &c in p.as_os_str().as_bytes() {
        match c {
            b' ' | b'\t' | b'\n' | b'\\' => want.extend_from_slice(format!("\\{c:03o}").as_bytes()),
            c => want.push(c),
        }
    }
    std::fs::read("/proc/self/mountinfo")
        .unwrap_or_default()
        .split(|&c| c == b'\n')
        .any(|l| l.split(|&c| c == b' ').nth(4) == Some(&want[..]))
}

/// A mounted store; unmounts (and detaches loop devices on it) when dropped.
pub struct Mounted<'a> {
    pub env: &'a Env,
    pub mnt: PathBuf,
    pub loops: Vec<PathBuf>,
}

impl<'a> Mounted<'a> {
    pub fn new(env: &'a Env, extra: &[&str]) -> Mounted<'a> {
        let mnt = env.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut args = vec!["mount", mnt.to_str().unwrap()];
        args.extend_from_slice(extra);
        env.ok(&args);
        assert!(is_mounted(&mnt), "mount returned before the mount was live");
        Mounted {
            env,
            mnt,
            loops: Vec::new(),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Loop-mount an exposed file at a fresh directory.
    pub fn loop_mount(&mut self, rel: &str, opts: &str) -> PathBuf {
        let dir = self.env.path(&format!("loop{}", self.loops.len()));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!(
            "mount -o loop{opts} {} {}",
            self.p(rel).display(),
            dir.display()
        ));
        self.loops.push(dir.clone());
        dir
    }

    pub fn loop_umount(&mut self, dir: &Path) {
        sh(&format!("umount {}", dir.display()));
        self.loops.retain(|d| d != dir);
    }

    /// The pid of the daemon serving this mount.
    pub fn daemon_pid(&self) -> String {
        // `[e]ncimg`: the pattern does not match the shell running pgrep.
        let pid = sh(&format!(
            "pgrep -o -f '[e]ncimg mount {}'",
            self.mnt.display()
        ));
        let pid = pid.trim().to_string();
        assert!(!pid.is_empty(), "daemon not found");
        pid
    }

    /// `kill -9` the daemon serving this mount, then detach the dead mount.
    pub fn kill_daemon(&self) {
        sh(&format!("kill -9 {}", self.daemon_pid()));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .status();
    }

    pub fn umount(mut self) {
        self.cleanup();
        std::mem::forget(self);
    }

    fn cleanup(&mut self) {
        for d in self.loops.drain(..) {
            let _ = Command::new("umount").arg(&d).status();
        }
        if is_mounted(&self.mnt) {
            let o = self.env.run(&["umount", self.mnt.to_str().unwrap()]);
            if !o.status.success() {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(&self.mnt)
                    .status();
            }
        }
        // Loop devices still bound to files under the mount (lazy teardown).
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "losetup -j {}/disks 2>/dev/null | cut -d: -f1 | xargs -r losetup -d",
                    self.mnt.display()
                ),
            ])
            .status();
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

pub fn control_write(m: &Mounted, file: &str, line: &str) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p(&format!(".control/{file}")))
        .unwrap();
    f.write_all_at(line.as_bytes(), 0).unwrap();
}

/// Write `line` to `.control/FILE` and read back, from the same descriptor, the id of the job
/// it made.
pub fn control_job(m: &Mounted, file: &str, line: &str) -> String {
    use std::io::{Read, Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p(&format!(".control/{file}")))
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
    let mut id = String::new();
    f.rewind().unwrap();
    f.read_to_string(&mut id).unwrap();
    id.trim().to_string()
}

pub fn last_job(m: &Mounted) -> String {
    let jobs = std::fs::read_to_string(m.p(".control/jobs")).unwrap();
    jobs.lines()
        .last()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// Run `cmd` as user nobody; returns whether it succeeded, and its stderr.
pub fn as_nobody(cmd: &str) -> (bool, String) {
    let o = Command::new("setpriv")
        .env("LC_ALL", "C")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}
