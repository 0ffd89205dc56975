//! Mounting without root: the setuid `fusermount3` opens `/dev/fuse`, mounts it at the
//! mountpoint on our behalf (after its own checks: the user owns or may write the
//! mountpoint, `allow_other` only with `user_allow_other` in /etc/fuse.conf), and hands the
//! device descriptor back over a socket (`_FUSE_COMMFD`), as libfuse does. fuser 0.18 opens
//! `/dev/fuse` itself first and gives up when that fails, which is why this is ours.
//! fusermount3 opens the device with the user's own rights, so where `/dev/fuse` is closed to
//! users (mode 0600) no ordinary user can mount FUSE: [`obstacle`] says so, and what to change.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::err;
use crate::error::{Error, Result};

/// Where fusermount3 is looked for, in order (`FUSERMOUNT_PATH` first, as fuser does).
fn binary() -> Option<OsString> {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(p);
    }
    for p in [
        "/usr/bin/fusermount3",
        "/bin/fusermount3",
        "/usr/local/bin/fusermount3",
    ] {
        if Path::new(p).exists() {
            return Some(p.into());
        }
    }
    None
}

/// Why a non-root mount cannot work here, in one line with what to change, if that can be
/// told before trying (`None`: try).
pub fn obstacle() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a container, pass the device in (--device /dev/fuse)".into(),
        );
    }
    // fusermount3 opens the device with the user's own rights: /dev/fuse's mode is the
    // host's word on whether ordinary users may mount FUSE filesystems.
    let dev = c"/dev/fuse";
    // SAFETY: access on a NUL-terminated path; no memory is written.
    if unsafe { libc::access(dev.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        let mode = std::fs::metadata("/dev/fuse")
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0);
        return Some(format!(
            "/dev/fuse is closed to ordinary users on this host (mode {mode:04o}): sudo chmod 0666 /dev/fuse (the fuse3 package's udev rule does this at boot), or mount as root"
        ));
    }
    let Some(bin) = binary() else {
        return Some(
            "mounting as an ordinary user needs fusermount3 (sudo apt-get install fuse3)".into(),
        );
    };
    match std::fs::metadata(&bin) {
        Ok(m) if m.uid() == 0 && m.mode() & 0o4000 != 0 => None,
        Ok(_) => Some(format!(
            "{} is not setuid root, so it cannot open /dev/fuse for you: sudo chmod u+s {}",
            Path::new(&bin).display(),
            Path::new(&bin).display()
        )),
        Err(e) => Some(format!("{}: {e}", Path::new(&bin).display())),
    }
}

/// Mount a FUSE filesystem at `mp` through fusermount3 with `options` (comma-separated
/// mount options); returns the `/dev/fuse` descriptor to serve it on.
pub fn mount(mp: &Path, options: &str) -> Result<OwnedFd> {
    if let Some(why) = obstacle() {
        return Err(err!(Denied, "cannot mount at {}: {why}", mp.display()));
    }
    let bin = binary().unwrap_or_else(|| "fusermount3".into());
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| Error::from(e).context("creating the fusermount3 socket"))?;
    // The child end must survive exec: clear its close-on-exec flag.
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(theirs.as_raw_fd(), libc::F_GETFD);
        libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, fl & !libc::FD_CLOEXEC);
    }
    let child = Command::new(&bin)
        .arg("-o")
        .arg(options)
        .arg("--")
        .arg(mp)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err!(Io, "cannot run {}: {e}", Path::new(&bin).display()))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child
        .wait_with_output()
        .map_err(|e| Error::from(e).context("waiting for fusermount3"))?;
    match received {
        Ok(fd) if out.status.success() => Ok(fd),
        _ => {
            let text = String::from_utf8_lossy(&out.stderr);
            let msg = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed")
                .trim()
                .to_string();
            let hint = if msg.contains("user_allow_other") || msg.contains("allow_other") {
                " (--allow-other needs 'user_allow_other' in /etc/fuse.conf)"
            } else if msg.contains("Permission denied") || msg.contains("not permitted") {
                " (the mountpoint must be a directory you own)"
            } else {
                ""
            };
            Err(err!(
                Denied,
                "cannot mount at {}: {msg}{hint}",
                mp.display()
            ))
        }
    }
}

/// Receive one descriptor (SCM_RIGHTS) from fusermount3.
fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one descriptor's control message, aligned as cmsghdr wants.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid starting value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
    let n = loop {
        // SAFETY: msg points at live buffers (iov, cbuf) sized as declared.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n == 0 {
        return Err(std::io::Error::other("fusermount3 sent nothing"));
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/CMSG_DATA walk its control buffer.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("fusermount3 sent no descriptor"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}
