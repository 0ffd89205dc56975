//! Disk-image formats for `import` and `export --format`: raw, qcow2, VMDK, VHD and VHDX,
//! told apart by their content (magic numbers), never by a file's name.
//!
//! Raw files are read directly. Every other format is read through qemu's own
//! implementation (qemu-utils, the reference): `qemu-nbd --read-only` serves the image's
//! plaintext on a private Unix socket and a small NBD client here reads it, so no plaintext
//! copy ever lands on disk, and `qemu-img map` says which ranges hold data, so holes stay
//! holes. Images that would pull in other files (a backing file, an external data file, a
//! VMDK descriptor naming extent files) are refused with the command that flattens them.
//! `export --format qcow2` runs `qemu-img convert`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::err;
use crate::error::{Error, IoContext, Result};

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// A single-file sparse VMDK (monolithicSparse or streamOptimized).
    Vmdk,
    /// VHD (qemu calls it `vpc`), fixed or dynamic.
    Vhd,
    Vhdx,
}

impl Format {
    /// qemu's name for it.
    pub fn qemu(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vpc",
            Format::Vhdx => "vhdx",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "VMDK",
            Format::Vhd => "VHD",
            Format::Vhdx => "VHDX",
        }
    }

    /// `import --format` values.
    pub fn parse_import(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            _ => Err(err!(
                InvalidInput,
                "unknown image format '{s}' (raw, qcow2, vmdk, vhd or vhdx)"
            )),
        }
    }

    /// `export --format` values.
    pub fn parse_export(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(err!(
                InvalidInput,
                "unknown export format '{s}' (raw or qcow2)"
            )),
        }
    }
}

/// What `f` holds, from its first and last 512 bytes. Formats qemu can read but encimg does
/// not take, and VMDK descriptor files, are refused naming what they are.
pub fn detect(f: &File, len: u64, what: &Path) -> Result<Format> {
    let mut head = [0u8; 512];
    let n = read_up_to(f, &mut head, 0).ctx(what.display())?;
    let head = &head[..n];
    let mut tail = [0u8; 512];
    let tail_n = if len >= 512 {
        read_up_to(f, &mut tail, len - 512).ctx(what.display())?
    } else {
        0
    };
    let refuse = |fmt: &str| {
        err!(
            Refused,
            "{} is a {fmt} image, which encimg does not import: convert it first (qemu-img convert -O qcow2 {} OUT.qcow2)",
            what.display(),
            what.display()
        )
    };
    if head.starts_with(b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if head.starts_with(b"KDMV") {
        return Ok(Format::Vmdk);
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if head.starts_with(b"conectix") || (tail_n == 512 && tail.starts_with(b"conectix")) {
        return Ok(Format::Vhd);
    }
    if head.starts_with(b"# Disk DescriptorFile") {
        return Err(err!(
            Refused,
            "{} is a VMDK descriptor that names separate extent files: make one file first (qemu-img convert -O vmdk -o subformat=monolithicSparse {} OUT.vmdk)",
            what.display(),
            what.display()
        ));
    }
    if head.starts_with(b"QED\0") {
        return Err(refuse("QED"));
    }
    if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return Err(refuse("VDI"));
    }
    Ok(Format::Raw)
}

fn read_up_to(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A qemu tool that could not be started, in one line (a missing one: how to install it).
fn spawn_error(tool: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err!(
                InvalidInput,
                "reading disk-image formats needs {tool} (sudo apt-get install qemu-utils)"
            )
        } else {
            err!(Io, "cannot run {tool}: {e}")
        }
    }
}

/// Run a qemu tool, returning stdout; a missing tool or a failure is one clear line.
fn qemu_tool(tool: &str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let o = Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(tool))?;
    if !o.status.success() {
        let text = String::from_utf8_lossy(&o.stderr);
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim();
        // qemu's own lines already begin with the tool's name.
        let line = line.strip_prefix(&format!("{tool}: ")).unwrap_or(line);
        return Err(err!(Corrupt, "{tool}: {line}"));
    }
    Ok(o.stdout)
}

/// A non-raw image opened for reading its plaintext: `qemu-nbd` serving it on a private
/// socket, and the connection to it. The server is stopped when this is dropped.
pub struct Image {
    child: Child,
    sock: UnixStream,
    dir: PathBuf,
    /// Virtual (plaintext) size.
    pub size: u64,
    /// Ranges holding data, from `qemu-img map` (everything else reads as zeros).
    pub extents: Vec<(u64, u64)>,
    /// The socket's directory when `dir` was too deep for one (see [`Image::open`]).
    sock_dir: Option<PathBuf>,
    cookie: u64,
}

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_DISC: u16 = 2;
const NBD_OPT_EXPORT_NAME: u32 = 1;
const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1;
const NBD_FLAG_NO_ZEROES: u16 = 2;

impl Image {
    /// Check `path` (of format `fmt`, not raw) and start serving it; `tmp` is a private
    /// directory for the socket.
    pub fn open(path: &Path, fmt: Format, tmp: &Path) -> Result<Image> {
        let shown = path;
        // qemu parses a file name again: `file:x` or `nbd:…` would name something else, and
        // `-x` an option. An absolute path is only ever a path to qemu.
        let path = &std::path::absolute(path).ctx(path.display())?;
        let fmt_arg = format!("--format={}", fmt.qemu());
        let info = qemu_tool(
            "qemu-img",
            &[
                "info".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                fmt.qemu().as_ref(),
                path.as_os_str(),
            ],
        )
        .map_err(|e| {
            e.context(format!(
                "{} is not a readable {} image",
                path.display(),
                fmt.name()
            ))
        })?;
        let info: serde_json::Value =
            serde_json::from_slice(&info).map_err(|e| err!(Corrupt, "qemu-img info: {e}"))?;
        if let Some(b) = info.get("backing-filename").and_then(|b| b.as_str()) {
            return Err(err!(
                Refused,
                "{} has a backing file ({b}): flatten it first (qemu-img convert -O {} {} OUT)",
                path.display(),
                fmt.qemu(),
                path.display()
            ));
        }
        let spec = &info["format-specific"]["data"];
        if spec.get("data-file").is_some() {
            return Err(err!(
                Refused,
                "{} keeps its data in an external file: flatten it first (qemu-img convert -O qcow2 {} OUT.qcow2)",
                path.display(),
                path.display()
            ));
        }
        if let Some(extents) = spec.get("extents").and_then(|x| x.as_array()) {
            let own = std::fs::canonicalize(path).ok();
            let foreign = extents.iter().any(|x| {
                x["filename"]
                    .as_str()
                    .is_some_and(|f| std::fs::canonicalize(f).ok() != own)
            });
            if foreign {
                return Err(err!(
                    Refused,
                    "{} names separate extent files: make one file first (qemu-img convert -O vmdk {} OUT.vmdk)",
                    path.display(),
                    path.display()
                ));
            }
        }
        let size = info["virtual-size"]
            .as_u64()
            .ok_or_else(|| err!(Corrupt, "qemu-img info gave no size for {}", path.display()))?;
        let extents = data_extents(path, fmt).map_err(|e| {
            e.context(format!(
                "{} is not a readable {} image",
                shown.display(),
                fmt.name()
            ))
        })?;

        crate::sys::private_dir(tmp)?;
        // A Unix socket's path has room for 107 bytes: a store deep in a home directory
        // gets one in a private directory of its own under the system's temp directory.
        let mut sock_dir = None;
        let mut sock_path = tmp.join("nbd.sock");
        if sock_path.as_os_str().len() > 100 {
            let d = crate::sys::temp_path(&std::env::temp_dir(), "encimg-nbd");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .ctx(d.display())?;
            sock_path = d.join("nbd.sock");
            sock_dir = Some(d);
        }
        let mut child = Command::new("qemu-nbd")
            .arg("--read-only")
            .arg(&fmt_arg)
            .arg("--shared=1")
            .arg(format!("--socket={}", sock_path.display()))
            .arg(path)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error("qemu-nbd"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            match UnixStream::connect(&sock_path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(_)) = child.try_wait() {
                        let mut text = String::new();
                        if let Some(mut e) = child.stderr.take() {
                            let _ = e.read_to_string(&mut text);
                        }
                        remove_dirs(tmp, sock_dir.as_deref());
                        return Err(err!(
                            Corrupt,
                            "qemu-nbd could not serve {}: {}",
                            path.display(),
                            text.lines().next().unwrap_or("it exited").trim()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    remove_dirs(tmp, sock_dir.as_deref());
                    return Err(err!(
                        Io,
                        "qemu-nbd did not start serving {}: {e}",
                        path.display()
                    ));
                }
            }
        };
        let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
        let mut img = Image {
            child,
            sock,
            dir: tmp.to_path_buf(),
            sock_dir,
            size,
            extents,
            cookie: 0,
        };
        let served = img
            .handshake()
            .map_err(|e| Error::from(e).context("talking to qemu-nbd"))?;
        if served != size {
            return Err(err!(
                Corrupt,
                "qemu-nbd serves {served} bytes of {} but qemu-img says {size}",
                path.display()
            ));
        }
        Ok(img)
    }

    /// Fixed-newstyle negotiation, export "" by name; returns the export's size.
    fn handshake(&mut self) -> std::io::Result<u64> {
        let mut hello = [0u8; 18];
        self.sock.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(std::io::Error::other("not an NBD server"));
        }
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
        let mine = u32::from(flags & (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
        self.sock.write_all(&mine.to_be_bytes())?;
        let mut opt = Vec::with_capacity(16);
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        self.sock.write_all(&opt)?;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        self.sock.read_exact(&mut reply)?;
        Ok(u64::from_be_bytes(
            reply[..8].try_into().unwrap_or_default(),
        ))
    }

    fn request(&mut self, kind: u16, off: u64, len: u32) -> std::io::Result<u64> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.sock.write_all(&r)?;
        Ok(self.cookie)
    }

    /// Read `buf.len()` bytes of plaintext at `off` (within the virtual size).
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        let cookie = self
            .request(NBD_CMD_READ, off, buf.len() as u32)
            .map_err(|e| Error::from(e).context("reading through qemu-nbd"))?;
        let mut head = [0u8; 16];
        self.sock
            .read_exact(&mut head)
            .map_err(|e| Error::from(e).context("reading through qemu-nbd"))?;
        let magic = u32::from_be_bytes(head[..4].try_into().unwrap_or_default());
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap_or_default());
        let got = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
        if magic != NBD_SIMPLE_REPLY_MAGIC || got != cookie {
            return Err(err!(Io, "qemu-nbd answered out of turn"));
        }
        if error != 0 {
            return Err(err!(
                Corrupt,
                "qemu-nbd could not read bytes {off}..{}: error {error} (the image is damaged?)",
                off + buf.len() as u64
            ));
        }
        self.sock
            .read_exact(buf)
            .map_err(|e| Error::from(e).context("reading through qemu-nbd"))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.request(NBD_CMD_DISC, 0, 0);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_dirs(&self.dir, self.sock_dir.as_deref());
    }
}

fn remove_dirs(tmp: &Path, sock_dir: Option<&Path>) {
    let _ = std::fs::remove_dir_all(tmp);
    if let Some(d) = sock_dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Most ranges an image's map keeps apart: past it, each range is joined to the one before
/// (the gap between is read through qemu, as the zeros it holds). A small crafted qcow2 can
/// list a million ranges no two of which join (data and zeros taking turns).
const MAX_EXTENTS: usize = 1 << 16;

/// Add data range `[start, start + len)` (ranges come in order): joined to the last one
/// where it continues it, or, past [`MAX_EXTENTS`] ranges, where it comes after it.
fn add_extent(extents: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    let full = extents.len() >= MAX_EXTENTS;
    match extents.last_mut() {
        Some(last) if last.0 + last.1 == start => last.1 += len,
        Some(last) if full && start > last.0 => last.1 = start.saturating_add(len) - last.0,
        _ => extents.push((start, len)),
    }
}

/// The ranges of `path` holding data (everything else reads as zeros), from `qemu-img map`,
/// read as it comes: one JSON object a line, none of them kept (the whole listing of a small
/// crafted image took gigabytes).
fn data_extents(path: &Path, fmt: Format) -> Result<Vec<(u64, u64)>> {
    use std::io::BufRead;
    #[derive(serde::Deserialize)]
    struct Entry {
        start: u64,
        length: u64,
        zero: bool,
    }
    let mut child = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", fmt.qemu()])
        .arg(path)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error("qemu-img"))?;
    // stderr is drained on a thread of its own, so a chatty qemu-img never blocks on it.
    let errs = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut t = String::new();
            let _ = (&mut e).take(64 << 10).read_to_string(&mut t);
            let _ = std::io::copy(&mut e, &mut std::io::sink());
            t
        })
    });
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut bad = None;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            let item = text.trim().trim_start_matches('[').trim_end_matches(']');
            let item = item.trim().trim_end_matches(',');
            if item.is_empty() || bad.is_some() {
                continue;
            }
            let m: Entry = match serde_json::from_str(item) {
                Ok(m) => m,
                Err(e) => {
                    bad = Some(e.to_string());
                    continue;
                }
            };
            if m.zero || m.length == 0 {
                continue;
            }
            add_extent(&mut extents, m.start, m.length);
        }
    }
    let status = child.wait().map_err(|e| err!(Io, "qemu-img map: {e}"))?;
    let text = errs.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim();
        let line = line.strip_prefix("qemu-img: ").unwrap_or(line);
        return Err(err!(Corrupt, "qemu-img map: {line}"));
    }
    if let Some(e) = bad {
        return Err(err!(Corrupt, "qemu-img map: {e}"));
    }
    Ok(extents)
}

/// Write the raw file `src` to `dest` as qcow2 (through a private directory next to `dest`,
/// so the plaintext is never readable by others; the result is 0600).
pub fn export_qcow2(src: &Path, dest: &Path, dir: &Path) -> Result<()> {
    let work = crate::sys::temp_path(dir, ".encimg-export");
    crate::sys::private_dir(&work)?;
    let out = work.join("out.qcow2");
    let r = (|| {
        qemu_tool(
            "qemu-img",
            &[
                "convert".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                src.as_os_str(),
                out.as_os_str(),
            ],
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600))
            .ctx(out.display())?;
        File::open(&out)
            .and_then(|f| f.sync_all())
            .ctx(out.display())?;
        super::ops::rename_noreplace(&out, dest)
    })();
    let _ = std::fs::remove_dir_all(&work);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_join_and_stay_bounded() {
        let mut x = Vec::new();
        add_extent(&mut x, 0, 10);
        add_extent(&mut x, 10, 5);
        add_extent(&mut x, 20, 5);
        assert_eq!(x, vec![(0, 15), (20, 5)]);
        // Data and holes taking turns, far past the bound: the list stops growing, and
        // every range is still covered.
        let mut x = Vec::new();
        let n = MAX_EXTENTS as u64 * 3;
        for i in 0..n {
            add_extent(&mut x, i * 128, 64);
        }
        assert_eq!(x.len(), MAX_EXTENTS);
        assert_eq!(x[MAX_EXTENTS - 2], ((MAX_EXTENTS as u64 - 2) * 128, 64));
        let last = x[MAX_EXTENTS - 1];
        assert_eq!(last.0 + last.1, (n - 1) * 128 + 64);
    }
}
