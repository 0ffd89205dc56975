//! Accounts of a system store (SPEC §10): the host's Unix users, each with a store of its
//! own inside the system store, and the images they share with each other.
//!
//! ```text
//! SYSTEM/                    /var/lib/encimg by default, root's, 0700
//!   system.json              marks a system store
//!   accounts/USER/           USER's store (laid out as a personal store)
//!   shares.json              who shares which image with whom
//!   audit.log                refused cross-account attempts, shares and unshares
//!   audit.log.1              the one before (see [`AUDIT_MAX`])
//! ```
//!
//! An account's CMKs are its own. Another account's CMK is usable only through a share: an
//! image under it shared with the caller (so a disk a recipient made from a shared image,
//! which keeps the owner's CMK, opens only while that share lasts and that CMK is usable).
//! Everything else is refused (exit 5, EACCES) and written to the audit log.

use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::err;
use crate::error::Result;
use crate::format::Kind;
use crate::kms::KeyStore;
use crate::store::{ResPath, Store};
use crate::sys::{self, FileLock};

pub const DEFAULT_SYSTEM_STORE: &str = "/var/lib/encimg";
pub const DEFAULT_SOCKET: &str = "/run/encimg.sock";
pub const DEFAULT_MOUNTPOINT: &str = "/run/encimg";
const MARK: &str = "system.json";

/// A Unix user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn passwd(p: *mut libc::passwd) -> Option<User> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null entry from getpw*_r points into our buffer, valid here.
    unsafe {
        Some(User {
            name: CStr::from_ptr((*p).pw_name).to_string_lossy().into_owned(),
            uid: (*p).pw_uid,
            gid: (*p).pw_gid,
        })
    }
}

impl User {
    pub fn by_uid(uid: u32) -> Option<User> {
        // SAFETY: passwd is plain data; zero is a valid value for every field.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut out = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local of the right type and size.
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        passwd(out)
    }

    pub fn by_name(name: &str) -> Option<User> {
        let c = CString::new(name).ok()?;
        // SAFETY: passwd is plain data; zero is a valid value for every field.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut out = std::ptr::null_mut();
        // SAFETY: as in by_uid; `c` is NUL-terminated.
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        passwd(out)
    }
}

/// Whether `dir` is a system store.
pub fn is_system(dir: &Path) -> bool {
    dir.join(MARK).is_file()
}

/// Make a system store at `dir` (root only).
pub fn init_system(dir: &Path) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(err!(
            Denied,
            "a system store is root's: run `sudo encimg init --system`"
        ));
    }
    if is_system(dir) {
        return Ok(false);
    }
    if dir.join("keys").exists() {
        return Err(err!(
            InvalidInput,
            "{} is a personal store; a system store needs a directory of its own",
            dir.display()
        ));
    }
    sys::private_dir(dir)?;
    sys::private_dir(&dir.join("accounts"))?;
    sys::write_atomic(&dir.join(MARK), b"{\"format\": 1}\n")?;
    Ok(true)
}

/// The account a store directory belongs to: `SYSTEM/accounts/NAME` of a system store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub system: PathBuf,
    pub name: String,
}

impl Account {
    pub fn of_store_dir(root: &Path) -> Option<Account> {
        let name = root.file_name()?.to_str()?.to_string();
        let accounts = root.parent()?;
        if accounts.file_name()? != "accounts" {
            return None;
        }
        let system = accounts.parent()?;
        is_system(system).then(|| Account {
            system: system.to_path_buf(),
            name,
        })
    }

    /// The store directory of account `name`.
    pub fn dir(system: &Path, name: &str) -> PathBuf {
        system.join("accounts").join(name)
    }

    pub fn store_of(&self, name: &str) -> Store {
        Store::at(&Self::dir(&self.system, name), "local")
    }

    /// Write one line to the system store's audit log (best effort).
    pub fn audit(&self, what: &str) {
        audit(&self.system, &format!("{}: {what}", self.name));
    }

    fn refuse(&self, what: &str) -> crate::error::Error {
        self.audit(&format!("refused: {what}"));
        tracing::warn!("account {}: refused: {what}", self.name);
        err!(Denied, "{what}: permission denied")
    }

    /// The key store holding CMK `key_id` of another account, if this account may use it:
    /// only through an image under that CMK which its owner shares with this account.
    pub fn foreign_keys(&self, key_id: &str) -> Result<KeyStore> {
        let Some(owner) = self.key_owner(key_id) else {
            return Err(err!(NotFound, "no key '{key_id}'"));
        };
        let granted = shares(&self.system)?.iter().any(|s| {
            s.owner == owner
                && s.with.contains(&self.name)
                && self
                    .store_of(&owner)
                    .info(&ResPath {
                        kind: Kind::Image,
                        name: s.image.clone(),
                    })
                    .ok()
                    .and_then(|i| i.header)
                    .is_some_and(|h| h.key.key_id == key_id)
        });
        if !granted {
            // Unusable, as a disabled key is (exit 6, EACCES): what the recipient made from
            // a shared image stops opening when the share ends.
            let what = format!(
                "key {key_id} belongs to account {owner} and nothing under it is shared with {}",
                self.name
            );
            self.audit(&format!("refused: {what}"));
            return Err(err!(KeyUnusable, "{what}"));
        }
        let keys = self.store_of(&owner).keys;
        // A service key is never shared, even if a shared image was rekeyed to it.
        if keys.read(|k| Ok(k.find(key_id)?.origin))? == crate::kms::Origin::Service {
            let what =
                format!("key {key_id} is account {owner}'s service key, which is never shared");
            self.audit(&format!("refused: {what}"));
            return Err(err!(KeyUnusable, "{what}"));
        }
        Ok(keys)
    }

    /// The account whose key store holds `key_id`.
    fn key_owner(&self, key_id: &str) -> Option<String> {
        std::fs::read_dir(self.system.join("accounts"))
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|name| *name != self.name)
            .find(|name| self.store_of(name).keys.holds(key_id))
    }

    /// `shared/OWNER/NAME`: the owner's store and image, if shared with this account.
    pub fn shared(&self, path: &str) -> Result<Option<(Store, ResPath)>> {
        let Some(rest) = path.strip_prefix("shared/") else {
            return Ok(None);
        };
        let (owner, name) = rest.split_once('/').ok_or_else(|| {
            err!(
                InvalidInput,
                "'{path}' is not a shared image (use shared/OWNER/NAME)"
            )
        })?;
        crate::store::validate_name(owner)?;
        crate::store::validate_name(name)?;
        let shared = shares(&self.system)?
            .iter()
            .any(|s| s.owner == owner && s.image == name && s.with.contains(&self.name));
        if !shared {
            return Err(self.refuse(&format!("{path} is not shared with {}", self.name)));
        }
        Ok(Some((
            self.store_of(owner),
            ResPath {
                kind: Kind::Image,
                name: name.to_string(),
            },
        )))
    }

    /// The images shared with this account: (owner, name).
    pub fn shared_with_me(&self) -> Result<Vec<(String, String)>> {
        let mut v: Vec<_> = shares(&self.system)?
            .into_iter()
            .filter(|s| s.with.contains(&self.name))
            .map(|s| (s.owner, s.image))
            .collect();
        v.sort();
        Ok(v)
    }
}

/// The longest line the audit log takes; what a line says past it is cut (a refused request
/// quotes its arguments, up to 64 KiB of them).
const AUDIT_LINE: usize = 1024;
/// Past this size `audit.log` becomes `audit.log.1` (replacing the one before), so refusals
/// any user can cause take at most twice this of the disk that holds every account's data.
pub const AUDIT_MAX: u64 = 16 << 20;

/// Append a line to `SYSTEM/audit.log` (cut at [`AUDIT_LINE`] bytes; the log rotates at
/// [`AUDIT_MAX`]).
pub fn audit(system: &Path, line: &str) {
    let p = system.join("audit.log");
    let open = || {
        sys::private_file_options()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&p)
    };
    let mut f = open();
    let full = f
        .as_ref()
        .ok()
        .and_then(|f| f.metadata().ok())
        .filter(|m| m.is_file() && m.len() >= AUDIT_MAX);
    if let Some(m) = full {
        use std::os::unix::fs::MetadataExt;
        // Only if the name still leads to the log found full: a writer that found it full
        // too, after another moved it aside, would move the new one over it.
        let same =
            std::fs::symlink_metadata(&p).is_ok_and(|n| n.ino() == m.ino() && n.dev() == m.dev());
        if same {
            let _ = std::fs::rename(&p, system.join("audit.log.1"));
        }
        f = open();
    }
    let mut line = line.replace('\n', " ");
    if line.len() > AUDIT_LINE {
        let mut cut = AUDIT_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let more = line.len() - cut;
        line.truncate(cut);
        line.push_str(&format!("… ({more} bytes more)"));
    }
    if let Ok(mut f) = f {
        let _ = writeln!(f, "{} {line}", sys::rfc3339(sys::now()));
    }
}

/// At most [`Throttle::PER_SECOND`] audit lines a second per user, for refusals a user can
/// cause as fast as they can ask (a mount's requests, the service's socket): the log keeps
/// the first of each second's.
#[derive(Default)]
pub struct Throttle(std::sync::Mutex<std::collections::HashMap<u32, (u64, u32)>>);

impl Throttle {
    pub const PER_SECOND: u32 = 20;

    /// Whether a line for `uid` goes into the log now.
    pub fn allow(&self, uid: u32) -> bool {
        let now = sys::now();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 4096 {
            m.retain(|_, (second, _)| *second == now);
        }
        let (second, count) = m.entry(uid).or_insert((now, 0));
        if *second != now {
            (*second, *count) = (now, 0);
        }
        *count += 1;
        *count <= Self::PER_SECOND
    }
}

/// One shared image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Share {
    pub owner: String,
    pub image: String,
    pub with: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ShareFile {
    format: u32,
    shares: Vec<Share>,
}

fn shares_path(system: &Path) -> PathBuf {
    system.join("shares.json")
}

/// Every share of the system store.
pub fn shares(system: &Path) -> Result<Vec<Share>> {
    let p = shares_path(system);
    if !sys::entry_exists(&p) {
        return Ok(Vec::new());
    }
    let bytes = sys::read_regular(&p, 64 << 20)?;
    let f: ShareFile = serde_json::from_slice(&bytes)
        .map_err(|e| err!(Corrupt, "{} is damaged: {e}", p.display()))?;
    Ok(f.shares)
}

/// Change the shares under their lock.
pub fn update_shares<T>(system: &Path, f: impl FnOnce(&mut Vec<Share>) -> Result<T>) -> Result<T> {
    let _lock = FileLock::exclusive_within(&system.join("shares.lock"), sys::LOCK_WAIT)?;
    let mut list = shares(system)?;
    let out = f(&mut list)?;
    list.retain(|s| !s.with.is_empty());
    let bytes = serde_json::to_vec_pretty(&ShareFile {
        format: 1,
        shares: list,
    })
    .map_err(|e| err!(Io, "{e}"))?;
    sys::write_atomic(&shares_path(system), &bytes)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_are_cut_and_the_log_rotates() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("audit.log");
        audit(
            d.path(),
            &format!("bob: refused request {}\nforged line", "A".repeat(60_000)),
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text.lines().count(),
            1,
            "a newline in what is logged makes one line"
        );
        assert!(text.len() < AUDIT_LINE + 64, "{} bytes", text.len());
        assert!(text.contains("bytes more)"), "{text}");
        // At the bound, the log moves aside and a new one begins.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(AUDIT_MAX)
            .unwrap();
        audit(d.path(), "bob: refused something");
        assert_eq!(
            std::fs::metadata(d.path().join("audit.log.1"))
                .unwrap()
                .len(),
            AUDIT_MAX
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.ends_with("bob: refused something\n"), "{text}");
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn the_audit_throttle_counts_each_user_apart() {
        let t = Throttle::default();
        let allowed = (0..100).filter(|_| t.allow(1000)).count() as u32;
        // Unless the second turned over meanwhile, exactly the bound.
        assert!((Throttle::PER_SECOND..=2 * Throttle::PER_SECOND).contains(&allowed));
        assert!(t.allow(1001), "another user has a budget of their own");
    }

    #[test]
    fn an_account_is_a_store_under_accounts_of_a_system_store() {
        let d = tempfile::tempdir().unwrap();
        let sys_dir = d.path().join("sys");
        std::fs::create_dir_all(sys_dir.join("accounts/alice")).unwrap();
        assert_eq!(Account::of_store_dir(&sys_dir.join("accounts/alice")), None);
        std::fs::write(sys_dir.join(MARK), "{}").unwrap();
        assert_eq!(
            Account::of_store_dir(&sys_dir.join("accounts/alice")),
            Some(Account {
                system: sys_dir.clone(),
                name: "alice".into()
            })
        );
        assert_eq!(Account::of_store_dir(&sys_dir), None);
        assert_eq!(User::by_uid(0).unwrap().name, "root");
        assert_eq!(User::by_name("root").unwrap().uid, 0);
        assert!(User::by_name("no-such-user-here").is_none());
    }
}
