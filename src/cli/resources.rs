//! `encimg import|create|snapshot|copy|rekey|info|list|export|delete|dek`

use crate::cli::{Bar, Command};
use crate::err;
use crate::error::Result;
use crate::format::Kind;
use crate::store::{CopyOptions, RekeyMode, ResPath, Store};

/// Parse a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || err!(InvalidInput, "invalid size '{s}' (e.g. 512M, 10G, 1T)");
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

fn sector(s: &Option<String>) -> Option<u32> {
    s.as_deref().and_then(|v| v.parse().ok())
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else if v.fract() == 0.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

/// `copy --to-region`: one line per destination, and an error naming the failed ones.
fn copy_to_regions(store: &Store, src: &ResPath, dst: &ResPath, opts: &CopyOptions) -> Result<()> {
    use std::sync::Arc;
    // Destinations in object storage: refused if the copy is there already; sent there
    // after. One whose store does not answer fails alone (destinations are independent).
    let mut down: Vec<(String, crate::Error)> = Vec::new();
    for region in &opts.to_regions {
        let ds = store.region_store(region)?;
        if ds.remote.is_none() {
            continue;
        }
        match ds.remote_exists(dst) {
            Ok(true) => {
                return Err(err!(
                    AlreadyExists,
                    "{dst} already exists in region {region}"
                ))
            }
            Ok(false) => {}
            Err(e) if e.kind == crate::error::ErrorKind::Io => {
                down.push((region.clone(), e.context(format!("region {region}"))));
            }
            Err(e) => return Err(e),
        }
    }
    let order = opts.to_regions.clone();
    let mut reachable = opts.clone();
    reachable
        .to_regions
        .retain(|r| !down.iter().any(|(d, _)| d == r));
    if reachable.to_regions.is_empty() {
        return Err(down.remove(0).1);
    }
    let opts = &reachable;
    let group = Bar::group();
    let bars = std::sync::Mutex::new(Vec::new());
    let mut outcomes = store.copy_to_regions(
        src,
        dst,
        opts,
        &|region| {
            let b = Arc::new(Bar::in_group(&group, &format!("copy to {region}")));
            bars.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(b.clone());
            b
        },
        None,
    )?;
    for b in bars.into_inner().unwrap_or_else(|p| p.into_inner()) {
        b.finish();
    }
    outcomes.extend(down.into_iter().map(|(r, e)| (r, Err(e))));
    outcomes.sort_by_key(|(region, _)| order.iter().position(|r| r == region));
    for (region, r) in outcomes.iter_mut() {
        if r.is_ok() {
            if let Ok(ds) = store.region_store(region) {
                if ds.remote.is_some() {
                    let info = ds.info(dst);
                    *r = ds.push(dst);
                    if r.is_err() {
                        ds.drop_local(dst);
                    }
                    if let (Ok(()), Ok(i)) = (&*r, info) {
                        println!("{region}: {dst} ({})", how(&i));
                        continue;
                    }
                }
            }
        }
        match r {
            Ok(()) => println!("{}", made_in(store, region, dst)),
            Err(e) => println!("{region}: failed: {e}"),
        }
    }
    crate::store::combine(&outcomes)
}

/// How a copy made in `region` is encrypted: `REGION: DST (CIPHER, key ID)`.
fn made_in(store: &Store, region: &str, dst: &ResPath) -> String {
    match store.region_store(region).and_then(|s| s.info(dst)) {
        Ok(i) => format!("{region}: {dst} ({})", how(&i)),
        Err(_) => format!("{region}: {dst}"),
    }
}

fn how(i: &crate::store::Info) -> String {
    match i.header.as_ref() {
        Some(h) => format!("{}, key {}", h.key.cipher.name(), h.key.key_id),
        None => "unencrypted".into(),
    }
}

/// An image shared with this account (`shared/OWNER/NAME`): its owner's store and path.
fn shared(store: &Store, path: &str) -> Result<Option<(Store, ResPath)>> {
    match crate::account::Account::of_store_dir(&store.root) {
        Some(a) => a.shared(path),
        None if path.starts_with("shared/") => Err(err!(
            InvalidInput,
            "'{path}': shared images are in system stores (encimg --system …)"
        )),
        None => Ok(None),
    }
}

/// Shared images are read-only: only read, copied and made into disks.
fn not_shared(store: &Store, path: &str, what: &str) -> Result<()> {
    if path.starts_with("shared/") {
        let msg = format!("{path} is shared with you read-only: it cannot be {what}");
        if let Some(a) = crate::account::Account::of_store_dir(&store.root) {
            a.audit(&format!("refused: {what} {path}"));
        }
        return Err(err!(Denied, "{msg}"));
    }
    Ok(())
}

/// Copy `src`, an image of `owner`'s shared with this account, to `dst` in `store`: under
/// `--key` (this account's), else the image's own CMK (the owner's, through the share), else
/// unencrypted or (with `--encrypt`) this account's service key.
fn copy_shared(
    store: &Store,
    owner: &Store,
    src: &ResPath,
    dst: &ResPath,
    key: &Option<String>,
    encrypt: bool,
    what: &str,
) -> Result<()> {
    let info = owner.info(src)?;
    let k = match (key, &info.header) {
        (Some(k), _) => Some(Some(store.resolve_key(k)?.0)),
        (None, Some(h)) => Some(Some(h.key.key_id.clone())),
        (None, None) if encrypt => Some(None),
        (None, None) => None,
    };
    let bar = std::sync::Arc::new(Bar::new(what));
    owner.copy_into_store(src, dst, store.clone(), k, bar.clone())?;
    bar.finish();
    Ok(())
}

/// `--key` names one of this account's own keys: another account's CMK is used only
/// through what it shares, never named (exit 5, audited).
fn own_key(store: &Store, key: &Option<String>) -> Result<()> {
    // Aliases are an account's own by construction; ids can name anyone's.
    let (Some(k), Some(a)) = (key, crate::account::Account::of_store_dir(&store.root)) else {
        return Ok(());
    };
    if !k.starts_with("key-") {
        return Ok(());
    }
    match store.keys.read(|ks| ks.find(k).map(|_| ())) {
        Err(e) if e.kind == crate::error::ErrorKind::NotFound => {
            a.audit(&format!("refused: --key {k}, not one of its keys"));
            Err(err!(
                Denied,
                "{k} is not one of your keys: permission denied"
            ))
        }
        r => r,
    }
}

/// A command on an object-storage region: what it reads is brought into the region's
/// local directory (whole, or only its header for `info`, `list` and `dek`), the command runs
/// there as in a directory region, what it wrote is sent back (blocks, then the pointer)
/// and every local copy is removed.
fn remote_run(store: &Store, cmd: Command) -> Result<()> {
    let local = store.clone().with_remote(None).with_private_locks();
    local.init()?;
    let mut pulled: Vec<ResPath> = Vec::new();
    let mut pull = |s: &str, header_only: bool| -> Result<()> {
        let r = ResPath::parse(s)?;
        if !local.exists(&r) {
            store.pull(&r, header_only)?;
            pulled.push(r);
        }
        Ok(())
    };
    let mut made: Vec<ResPath> = Vec::new();
    // Locks held until the command's result is in the object store.
    let mut held = Vec::new();
    let mut new = |s: &str| -> Result<()> {
        let r = ResPath::parse(s)?;
        if store.remote_exists(&r)? {
            return Err(err!(AlreadyExists, "{r} already exists"));
        }
        made.push(r);
        Ok(())
    };
    match &cmd {
        Command::Import { res, .. } => new(res)?,
        Command::Create { res, from, .. } => {
            new(res)?;
            if let Some(f) = from.as_deref().filter(|f| !f.starts_with("shared/")) {
                pull(f, false)?;
            }
        }
        Command::Snapshot { disk, snapshot } => {
            pull(disk, false)?;
            new(snapshot)?;
        }
        Command::Copy {
            src,
            dst,
            to_region,
            ..
        } => {
            pull(src, false)?;
            if to_region.is_empty() {
                new(dst)?;
            }
        }
        Command::Rekey { res, .. } => {
            // The new version replaces the one a mount may have open (its window would go
            // on sending fsync'd writes to the version dropped here): refused meanwhile.
            let r = ResPath::parse(res)?;
            held.push(store.lock_job(&r)?);
            held.push(store.lock_alone(&r)?);
            pull(res, false)?;
            made.push(r);
        }
        Command::Info { res, .. } | Command::Dek { res, .. } => pull(res, true)?,
        Command::Export { res, .. } => pull(res, false)?,
        Command::Delete { res } => {
            let r = ResPath::parse(res)?;
            let _job = store.lock_job(&r)?;
            let _alone = store.lock_alone(&r)?;
            store.remote_delete(&r)?;
            println!("deleted {r}");
            return Ok(());
        }
        Command::List { kind, .. } => {
            let kind = kind.as_deref().and_then(Kind::from_dir);
            for r in store.remote_list(kind)? {
                pull(&r.to_string(), true)?;
            }
        }
        _ => {}
    }
    let result = run(&local, cmd).and_then(|()| made.iter().try_for_each(|r| store.push(r)));
    for r in pulled.iter().chain(made.iter()) {
        local.drop_local(r);
    }
    result
}

/// The mount serving `store`, if one does: its mountpoint and whether it writes images
/// (`--writable-images`), from the record the daemon keeps in `locks/store.mount`. Touches
/// nothing of the mount itself (a stopped daemon would hang this): the record counts only
/// while the store's directory lock is held, which the serving daemon holds for its life,
/// so a record a killed daemon left (its pid since reused, its mountpoint since another
/// store's) does not.
fn mount_record(store: &Store) -> Option<(std::path::PathBuf, bool)> {
    match crate::sys::FileLock::try_exclusive_dir(&store.root) {
        // Nobody serves the store (the lock goes again at once).
        Ok(Some(_)) | Err(_) => return None,
        Ok(None) => {}
    }
    let info = store.root.join("locks").join("store.mount");
    let text = crate::sys::read_regular(&info, 4096).ok()?;
    let text = String::from_utf8(text).ok()?;
    let mut l = text.lines();
    let pid: u32 = l.next()?.trim().parse().ok()?;
    let mp = std::path::PathBuf::from(l.next()?.trim());
    let writable_images = l.next().is_some_and(|f| f.trim() == "writable-images");
    crate::sys::process_alive(pid).then_some((mp, writable_images))
}

/// `encimg job cancel ID`: ask the mount that runs job `id` to stop it, and wait for it to
/// end.
pub fn cancel_job(store: &Store, jobs: &crate::control::jobs::JobStore, id: &str) -> Result<()> {
    let j = jobs.get(id)?;
    if j.state.is_final() {
        return Err(err!(
            InvalidInput,
            "job {id} is not running (it is {})",
            j.state.name()
        ));
    }
    let Some((mp, _)) = mount_record(store).filter(|(mp, _)| has_control(mp)) else {
        return Err(err!(
            InvalidInput,
            "job {id} is not running: no mount serves this store"
        ));
    };
    send_cancel(&mp, id)?;
    let j = jobs.wait(id)?;
    println!("{}", j.line());
    if j.state != crate::control::jobs::JobState::Cancelled {
        return Err(crate::error::Error::new(
            j.error_kind(),
            format!("job {id} ended {} before it stopped", j.state.name()),
        ));
    }
    Ok(())
}

/// Write `id` to the mount's `.control/cancel`; the refusal's reason is the errno's.
fn send_cancel(mp: &std::path::Path, id: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(mp.join(".control").join("cancel"))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err!(
                Refused,
                "the mount at {} runs an older encimg that cannot cancel jobs: job {id} goes on (encimg job wait {id})",
                mp.display()
            ),
            _ => crate::error::Error::from(e).context(format!("cancelling job {id}")),
        })?;
    f.write_all(format!("{id}\n").as_bytes()).map_err(|e| {
        let kind = crate::error::ErrorKind::from_errno(e.raw_os_error().unwrap_or(libc::EIO));
        let why = match kind {
            crate::error::ErrorKind::NotFound => "it is not running there".to_string(),
            crate::error::ErrorKind::Refused => {
                "a rekey is not cancelled (a re-encryption goes on at the next mount)".into()
            }
            crate::error::ErrorKind::Busy => {
                "it is putting its result in place: too late to cancel".into()
            }
            _ => e.to_string(),
        };
        crate::error::Error::new(
            kind,
            format!(
                "the mount at {} did not cancel job {id}: {why}",
                mp.display()
            ),
        )
    })
}

/// Set while a CLI following a job in the mount has been sent SIGINT or SIGTERM.
static STOP_ASKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn ask_stop(_: libc::c_int) {
    STOP_ASKED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// While it lives, SIGINT and SIGTERM only set [`STOP_ASKED`] (once: the handler resets, so
/// a second one ends the process); a signal this process was started ignoring (a shell's
/// background job) stays ignored. Dropped, the dispositions are as before.
struct CatchStop(Vec<(libc::c_int, libc::sigaction)>);

impl CatchStop {
    fn new() -> CatchStop {
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: all-zero sigactions are valid; the handler only stores to an atomic;
            // `was` is written by the kernel before it is read.
            unsafe {
                let mut was: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut was) != 0
                    || was.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = ask_stop as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) == 0 {
                    old.push((sig, was));
                }
            }
        }
        CatchStop(old)
    }
}

impl Drop for CatchStop {
    fn drop(&mut self) {
        for (sig, was) in &self.0 {
            // SAFETY: `was` is the disposition the kernel gave back for `sig`.
            unsafe { libc::sigaction(*sig, was, std::ptr::null_mut()) };
        }
    }
}

/// Whether `mp` is a FUSE mount with a control directory.
fn has_control(mp: &std::path::Path) -> bool {
    const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
    let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is valid; `c` is a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a live, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type != FUSE_SUPER_MAGIC {
        return false;
    }
    mp.join(".control").join("jobs").exists()
}

/// Ask the mount serving the store, if any, to run a snapshot or copy of a disk, or of an
/// image it writes (a line for its `.control/OP`: `SRC DST` and `extra`), and follow the job
/// to its end. The mount's copy holds the source as of one instant while its writes go on
/// (see `store::freeze`); a copy made here could not see the mount's writes in flight.
/// `Ok(false)`: a source the mount does not write, no mount, or its control file refused
/// the line (then the caller runs it here, and its checks give the reason). Ctrl-C (SIGINT,
/// SIGTERM) cancels the job; a second one, or SIGKILL, ends this process and leaves the job
/// running in the mount (`encimg job wait ID` follows it).
fn through_mount(
    store: &Store,
    op: &str,
    src: &ResPath,
    dst: &ResPath,
    extra: &str,
    bar: &Bar,
) -> Result<bool> {
    use crate::control::jobs::{JobState, JobStore};
    use crate::store::Progress;
    use std::io::{IsTerminal, Write};
    if src.kind == Kind::Snapshot {
        return Ok(false);
    }
    let Some((mp, writable_images)) = mount_record(store) else {
        return Ok(false);
    };
    if !(src.kind == Kind::Disk || writable_images) || !has_control(&mp) {
        return Ok(false);
    }
    // From before the request is made, so a Ctrl-C right after it still cancels the job.
    let stop = CatchStop::new();
    // Ours is the newest job after this (for a mount that cannot say which is ours).
    let after = crate::control::jobs::Job::id_floor();
    let control = mp.join(".control");
    // The mount answers a read of the descriptor that made a job with that job's id.
    let open = |read| {
        std::fs::OpenOptions::new()
            .read(read)
            .write(true)
            .open(control.join(op))
    };
    // A mount from before this has write-only control files and answers reads with EINVAL:
    // it cannot say.
    let sent = open(true)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => open(false),
            _ => Err(e),
        })
        .and_then(|mut f| {
            f.write_all(format!("{src} {dst}{extra}\n").as_bytes())?;
            // From the start: the write moved the descriptor's offset past the request.
            let mut made = String::new();
            let _ = std::io::Seek::rewind(&mut f)
                .and_then(|()| std::io::Read::read_to_string(&mut f, &mut made));
            Ok(made)
        });
    let made = match sent {
        Ok(made) => made,
        Err(e) => {
            tracing::debug!("{} refused the {op}: {e}; running it here", mp.display());
            drop(stop);
            if STOP_ASKED.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(err!(Cancelled, "{op} {src} {dst}: interrupted"));
            }
            return Ok(false);
        }
    };
    // The mount's own list: it has every job, the ones whose record it could not write
    // (a full disk) too.
    let listed = || -> Vec<Vec<String>> {
        std::fs::read_to_string(control.join("jobs"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(8, ' ').map(str::to_string).collect())
            .filter(|f: &Vec<String>| f.len() == 8)
            .collect()
    };
    let (source, destination) = (src.to_string(), dst.to_string());
    let id = match made.lines().next() {
        Some(id) => id.to_string(),
        None => listed()
            .into_iter()
            .filter(|f| f[1] == op && f[2] == source && f[3] == destination && f[4] != "rejected")
            .map(|f| f[0].clone())
            .filter(|id| *id > after)
            .max()
            .ok_or_else(|| {
                err!(
                    Io,
                    "the mount at {} took the {op} but does not list its job",
                    mp.display()
                )
            })?,
    };
    if std::io::stderr().is_terminal() {
        let _ = writeln!(
            std::io::stderr(),
            "encimg: {op} running in the mount at {} as {id} (Ctrl-C cancels it)",
            mp.display()
        );
    }
    let jobs = JobStore::new(&store.root);
    let failed = |kind: crate::error::ErrorKind, why: &str| {
        crate::error::Error::new(
            kind,
            format!(
                "{op} {src} {dst}, run by the mount at {} (job {id}): {why}",
                mp.display()
            ),
        )
    };
    let mut shown = 0;
    let mut cancelling = false;
    for round in 1u64.. {
        if !cancelling && STOP_ASKED.load(std::sync::atomic::Ordering::Relaxed) {
            cancelling = true;
            match send_cancel(&mp, &id) {
                Ok(()) => {
                    let _ = writeln!(std::io::stderr(), "encimg: cancelling {op} job {id}");
                }
                // Ended meanwhile, or too late to stop: its outcome follows.
                Err(e)
                    if matches!(
                        e.kind,
                        crate::error::ErrorKind::NotFound | crate::error::ErrorKind::Busy
                    ) =>
                {
                    let _ = writeln!(std::io::stderr(), "encimg: {}", e.message);
                }
                Err(e) => return Err(e),
            }
        }
        let j = jobs.get(&id)?;
        if j.total > 0 {
            bar.start(j.total);
        }
        bar.add(j.bytes.saturating_sub(shown));
        shown = shown.max(j.bytes);
        match j.state {
            JobState::Done => return Ok(true),
            JobState::Interrupted => {
                return Err(failed(
                    crate::error::ErrorKind::Io,
                    "the mount stopped before the job ended",
                ))
            }
            s if s.is_final() => {
                return Err(failed(
                    j.error_kind(),
                    j.error.as_deref().unwrap_or("failed"),
                ));
            }
            _ => {}
        }
        // The record on disk says running: the mount's list may know better (it keeps
        // what it could not write).
        if round % 20 == 0 {
            if let Some(f) = listed().into_iter().find(|f| f[0] == id) {
                match f[4].as_str() {
                    "done" => return Ok(true),
                    "cancelled" => {
                        return Err(failed(crate::error::ErrorKind::Cancelled, "cancelled"))
                    }
                    "failed" | "interrupted" | "rejected" => {
                        let kind = if f[7].contains("No space left") {
                            crate::error::ErrorKind::NoSpace
                        } else {
                            crate::error::ErrorKind::Io
                        };
                        return Err(failed(kind, &f[7]));
                    }
                    _ => {}
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unreachable!("the loop above runs until the job ends")
}

pub fn run(store: &Store, cmd: Command) -> Result<()> {
    if store.remote.is_some() {
        return remote_run(store, cmd);
    }
    match &cmd {
        Command::Import { key, .. } | Command::Create { key, .. } => own_key(store, key)?,
        Command::Copy { key, to_region, .. } if to_region.is_empty() => own_key(store, key)?,
        Command::Rekey { key, .. } => own_key(store, &Some(key.clone()))?,
        _ => {}
    }
    match &cmd {
        Command::Snapshot { disk, .. } => not_shared(store, disk, "snapshotted")?,
        Command::Rekey { res, .. } => not_shared(store, res, "rekeyed")?,
        Command::Delete { res } => not_shared(store, res, "deleted")?,
        Command::Export { res, .. } => not_shared(store, res, "exported")?,
        Command::Dek { res, .. } => not_shared(store, res, "asked for its data key")?,
        Command::Import { res, .. } | Command::Create { res, .. } => {
            not_shared(store, res, "written")?
        }
        Command::Copy { dst, .. } => not_shared(store, dst, "written")?,
        _ => {}
    }
    match cmd {
        Command::Import {
            file,
            res,
            encrypt,
            key,
            sector_size,
            format,
        } => {
            let dst = ResPath::parse(&res)?;
            let format = format
                .as_deref()
                .map(crate::store::imgfmt::Format::parse_import)
                .transpose()?;
            store.init()?;
            let bar = Bar::new("import");
            let read_as = store.import(
                &file,
                &dst,
                encrypt,
                key.as_deref(),
                sector(&sector_size),
                format,
                &bar,
            )?;
            bar.finish();
            if format.is_none() && read_as != crate::store::imgfmt::Format::Raw {
                eprintln!(
                    "encimg: {} was read as a {} image (--format raw takes it as a raw disk)",
                    file.display(),
                    read_as.name()
                );
            }
            println!("{dst}");
            Ok(())
        }
        Command::Create {
            res,
            size,
            from,
            encrypt,
            key,
            sector_size,
        } => {
            let dst = ResPath::parse(&res)?;
            if dst.kind != Kind::Disk {
                return Err(err!(InvalidInput, "create makes disks: use disks/NAME"));
            }
            store.init()?;
            if let Some((owner, src)) = from
                .as_deref()
                .map(|f| shared(store, f))
                .transpose()?
                .flatten()
            {
                // A disk from a shared image keeps the owner's CMK (new data key under it).
                if encrypt || key.is_some() {
                    return Err(err!(
                        Refused,
                        "a disk from an image keeps the image's encryption and key; use copy to change them"
                    ));
                }
                copy_shared(store, &owner, &src, &dst, &None, false, "create")?;
            } else if let Some(from) = from {
                let src = ResPath::parse(&from)?;
                let opts = CopyOptions {
                    encrypt,
                    key,
                    unencrypted: false,
                    sector_size: sector(&sector_size),
                    to_regions: Vec::new(),
                };
                let bar = Bar::new("create");
                store.create_from(&dst, &src, &opts, &bar)?;
            } else {
                let size = parse_size(size.as_deref().unwrap_or_default())?;
                store.create_blank(&dst, size, encrypt, key.as_deref(), sector(&sector_size))?;
            }
            println!("{dst}");
            Ok(())
        }
        Command::Snapshot { disk, snapshot } => {
            let src = ResPath::parse(&disk)?;
            let dst = ResPath::parse(&snapshot)?;
            let bar = Bar::new("snapshot");
            if !through_mount(store, "snapshot", &src, &dst, "", &bar)? {
                store.snapshot(&src, &dst, &bar, None)?;
            }
            println!("{dst}");
            Ok(())
        }
        Command::Copy {
            src,
            dst,
            encrypt,
            key,
            unencrypted,
            to_region,
        } => {
            if let Some((owner, s)) = shared(store, &src)? {
                if unencrypted || !to_region.is_empty() {
                    return Err(err!(
                        InvalidInput,
                        "a shared image is copied into your own store, as it is or under --key"
                    ));
                }
                let dst = ResPath::parse(&dst)?;
                if dst.kind == Kind::Disk {
                    return Err(err!(
                        InvalidInput,
                        "copy makes images and snapshots; create disks/NAME --from {src}"
                    ));
                }
                copy_shared(store, &owner, &s, &dst, &key, encrypt, "copy")?;
                println!("{dst}");
                return Ok(());
            }
            let src = ResPath::parse(&src)?;
            let dst = ResPath::parse(&dst)?;
            let opts = CopyOptions {
                encrypt,
                key,
                unencrypted,
                sector_size: None,
                to_regions: to_region,
            };
            let bar = Bar::new("copy");
            let mut extra = String::new();
            if let Some(k) = &opts.key {
                extra += &format!(" key={k}");
            }
            if opts.encrypt {
                extra += " encrypt";
            }
            if opts.unencrypted {
                extra += " unencrypted";
            }
            // A key that is not one word of a control line (`key=a region=b` would be two)
            // is not handed over; the copy here refuses it as no such key.
            let one_word = opts.key.as_ref().is_none_or(|k| {
                !k.is_empty() && !k.chars().any(|c| c.is_whitespace() || c.is_control())
            });
            if !opts.to_regions.is_empty() {
                // The mount copies images to regions on this host's disk (an object-storage
                // destination is sent there from here, after: see `copy_to_regions`). Disks
                // do not cross regions: the copy here says so, without asking the mount.
                let local = src.kind != Kind::Disk
                    && opts
                        .to_regions
                        .iter()
                        .all(|r| store.region_store(r).is_ok_and(|s| s.remote.is_none()));
                extra += &format!(" region={}", opts.to_regions.join(","));
                if local && one_word && through_mount(store, "copy", &src, &dst, &extra, &bar)? {
                    for region in &opts.to_regions {
                        println!("{}", made_in(store, region, &dst));
                    }
                    return Ok(());
                }
                drop(bar);
                return copy_to_regions(store, &src, &dst, &opts);
            }
            if !(one_word && through_mount(store, "copy", &src, &dst, &extra, &bar)?) {
                store.copy(&src, &dst, &opts, &bar)?;
            }
            println!("{dst}");
            Ok(())
        }
        Command::Rekey {
            res,
            key,
            reencrypt,
        } => {
            let r = ResPath::parse(&res)?;
            let mode = if reencrypt {
                RekeyMode::Reencrypt
            } else {
                RekeyMode::Rewrap
            };
            let bar = Bar::new("re-encrypt");
            store.rekey(&r, &key, mode, &bar)?;
            let info = store.info(&r)?;
            if let Some(h) = info.header {
                println!("{r}: key {} version {}", h.key.key_id, h.key.key_version);
            }
            Ok(())
        }
        Command::Info { res, json } => {
            let v = if let Some((owner, r)) = shared(store, &res)? {
                let mut v = owner.info(&r)?.to_json();
                v["path"] = res.clone().into();
                v["shared_by"] = owner
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .into();
                v
            } else {
                let r = ResPath::parse(&res)?;
                store.check()?;
                store.info(&r)?.to_json()
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    let s = match val {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    println!("{k:<12} {s}");
                }
            }
            Ok(())
        }
        Command::List { kind, json } => {
            let kind = match kind.as_deref() {
                None => None,
                Some(k) => Some(Kind::from_dir(k).ok_or_else(|| {
                    err!(
                        InvalidInput,
                        "unknown kind '{k}' (use images, disks or snapshots)"
                    )
                })?),
            };
            let listed = store.list_infos(kind)?;
            // Images shared with this account, as shared/OWNER/NAME.
            let mut shared_list = Vec::new();
            if let Some(a) = crate::account::Account::of_store_dir(&store.root) {
                if kind.is_none_or(|k| k == Kind::Image) {
                    for (owner, name) in a.shared_with_me()? {
                        let r = ResPath {
                            kind: Kind::Image,
                            name: name.clone(),
                        };
                        if let Ok(i) = a.store_of(&owner).info(&r) {
                            shared_list.push((format!("shared/{owner}/{name}"), owner, i));
                        }
                    }
                }
            }
            if json {
                let own = listed
                    .iter()
                    .map(|l| crate::store::listed_json(l, &store.region));
                let shared = shared_list.iter().map(|(path, owner, i)| {
                    let mut j = i.to_json();
                    j["path"] = path.clone().into();
                    j["shared_by"] = owner.clone().into();
                    j["region"] = store.region.clone().into();
                    j
                });
                // Written as it is made: a store of 100,000 resources is tens of MB of JSON,
                // and a tree of it would be ten times that in memory.
                print_json_seq(own.chain(shared))?;
            } else {
                println!("{:<40}  {:>8}  {:<16}  KEY", "RESOURCE", "SIZE", "CIPHER");
                for (r, i) in &listed {
                    match i {
                        Ok(i) => {
                            let h = i.header.as_ref();
                            println!(
                                "{:<40}  {:>8}  {:<16}  {}",
                                r.to_string(),
                                human(i.size),
                                h.map(|h| h.key.cipher.name()).unwrap_or("none"),
                                h.map(|h| h.key.key_id.as_str()).unwrap_or("-")
                            );
                        }
                        Err(e) => println!("{:<40}  DAMAGED: {}", r.to_string(), e.message),
                    }
                }
                for (path, _, i) in &shared_list {
                    let h = i.header.as_ref();
                    println!(
                        "{:<40}  {:>8}  {:<16}  {}",
                        path,
                        human(i.size),
                        h.map(|h| h.key.cipher.name()).unwrap_or("none"),
                        h.map(|h| h.key.key_id.as_str()).unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Export { res, file, format } => {
            let r = ResPath::parse(&res)?;
            let fmt = crate::store::imgfmt::Format::parse_export(&format)?;
            store.check()?;
            let bar = Bar::new("export");
            store.export_as(&r, &file, fmt, &bar)?;
            println!("{}", file.display());
            Ok(())
        }
        Command::Delete { res } => {
            let r = ResPath::parse(&res)?;
            store.check()?;
            store.delete(&r)?;
            super::sharing::forget(store, &r);
            println!("deleted {r}");
            Ok(())
        }
        Command::Dek { res, reveal } => {
            let r = ResPath::parse(&res)?;
            if !reveal {
                return Err(err!(
                    InvalidInput,
                    "dek prints the data key in plaintext: pass --reveal to confirm"
                ));
            }
            store.check()?;
            let dek = store.dek(&r)?;
            let text = zeroize::Zeroizing::new(hex::encode(&dek[..]));
            println!("{}", &*text);
            Ok(())
        }
        Command::Init { .. }
        | Command::Serve { .. }
        | Command::Share { .. }
        | Command::Unshare { .. }
        | Command::Key(_)
        | Command::Region(_)
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Job(_)
        | Command::Mount(_)
        | Command::Umount(_) => Ok(()),
    }
}

/// Print a JSON array (pretty, as `to_string_pretty` would) from values made one at a time.
fn print_json_seq(items: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    struct Seq<I>(std::cell::RefCell<Option<I>>);
    impl<I: Iterator<Item = serde_json::Value>> serde::Serialize for Seq<I> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_seq(self.0.borrow_mut().take().into_iter().flatten())
        }
    }
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, &Seq(std::cell::RefCell::new(Some(items))))
        .map_err(|e| err!(Io, "writing the list: {e}"))?;
    crate::error::IoContext::ctx(writeln!(out).and_then(|()| out.flush()), "writing the list")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human(1 << 30), "1G");
    }
}
