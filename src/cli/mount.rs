//! `encimg mount` and `encimg umount`.

use std::path::PathBuf;

use crate::error::Result;
use crate::fs::MountOptions;
use crate::mount::{self, MountConfig};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Directory to mount the store on (images/, disks/, snapshots/, .control/)
    pub mountpoint: PathBuf,
    /// Stay in the foreground until unmounted (Ctrl-C unmounts) instead of running as a
    /// daemon (which logs to STORE/mount.log)
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Bound of the plaintext sector cache (K, M, G, T suffixes: powers of 1024)
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub cache_size: String,
    /// Mount read-only: every write and control request is refused
    #[arg(long)]
    pub read_only: bool,
    /// Let other users use the mount (non-root users need user_allow_other in /etc/fuse.conf)
    #[arg(long)]
    pub allow_other: bool,
    /// Let images be written through the mount (they are read-only by default)
    #[arg(long)]
    pub writable_images: bool,
    /// (object-storage regions) Keep fetched blocks here [default: STORE/regions/NAME/cache]
    #[arg(long, value_name = "DIR")]
    pub object_cache: Option<PathBuf>,
    /// (object-storage regions) Bound of the fetched blocks kept: past it, the copy of a
    /// resource nobody has open is dropped
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    pub object_cache_size: String,
    /// Take requests through FUSE over io_uring where the kernel offers it (Linux 6.14+
    /// with the fuse module's enable_uring=1): many readers at once on fast storage get
    /// about twice the requests a second; one reader at a deep queue fewer
    #[arg(long, env = "ENCIMG_IO_URING", value_parser = clap::builder::FalseyValueParser::new())]
    pub io_uring: bool,
    /// (`encimg serve`) Serve one account of a system store: the nodes are its uid's, and
    /// only it (and root) may use the mount
    #[arg(long, hide = true, value_name = "UID")]
    pub account_uid: Option<u32>,
}

#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    /// Directory the store is mounted on
    pub mountpoint: PathBuf,
}

/// Mount the store; as a daemon this returns once the mount is live.
pub fn run_mount(store: &Store, a: MountArgs) -> Result<()> {
    let cache_bytes = super::resources::parse_size(&a.cache_size)?;
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    let (mut uid, mut gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if let Some(acct) = a.account_uid {
        if uid != 0 {
            return Err(crate::err!(
                Denied,
                "--account-uid is for encimg serve (root)"
            ));
        }
        let u = crate::account::User::by_uid(acct)
            .ok_or_else(|| crate::err!(InvalidInput, "no user with uid {acct}"))?;
        (uid, gid) = (u.uid, u.gid);
    }
    let cfg = MountConfig {
        mountpoint: a.mountpoint,
        foreground: a.foreground,
        // An account's mount: the kernel lets everyone reach it, FuseFs admits only the
        // account (and logs anyone else); its nodes stay private to the account.
        allow_other: a.allow_other || a.account_uid.is_some(),
        account: a.account_uid.is_some(),
        read_only: a.read_only,
        io_uring: a.io_uring,
        fs_opts: MountOptions {
            read_only: a.read_only,
            writable_images: a.writable_images,
            cache_bytes,
            allow_other: a.allow_other && a.account_uid.is_none(),
            uid,
            gid,
            account_uid: a.account_uid,
            object_cache_bytes: match store.remote {
                Some(_) => Some(super::resources::parse_size(&a.object_cache_size)?),
                None => None,
            },
        },
    };
    mount::mount(store.clone(), cfg)
}

/// Unmount and wait for the daemon to finish.
pub fn run_umount(a: UmountArgs) -> Result<()> {
    mount::umount(&a.mountpoint)?;
    println!("unmounted {}", a.mountpoint.display());
    Ok(())
}
