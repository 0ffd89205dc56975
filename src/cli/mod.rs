//! The command line: clap definitions, dispatch into the library, human and JSON output,
//! progress bars. Errors come back as `Error`; `main` prints them as one line.

mod docs;
mod keys;
mod mount;
mod progress;
mod regions;
mod remote;
mod resources;
mod sharing;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::Result;
use crate::store::{default_store_dir, Store};

pub use progress::Bar;

#[derive(Parser, Debug)]
#[command(
    name = "encimg",
    version,
    about = "Disk images, disks and snapshots encrypted at rest (envelope encryption), exposed through FUSE",
    propagate_version = true
)]
pub struct Cli {
    /// Store directory [default: $XDG_DATA_HOME/encimg or ~/.local/share/encimg]
    #[arg(long, global = true, env = "ENCIMG_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Region: the place whose resources, keys and jobs the command works on
    #[arg(
        long,
        global = true,
        env = "ENCIMG_REGION",
        default_value = "local",
        value_name = "NAME"
    )]
    pub region: String,
    /// Read the key-store passphrase from the first line of FILE (`/dev/fd/N` for a
    /// descriptor); also ENCIMG_PASSPHRASE_FILE, or ENCIMG_PASSPHRASE (erased once read)
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Use the host's system store through `encimg serve` (its socket: ENCIMG_SOCKET, default
    /// /run/encimg.sock): your account's resources and keys, and what is shared with you
    #[arg(long, global = true)]
    pub system: bool,
    /// Wait at most SECS for an external key service (KMIP, PKCS#11) before failing with
    /// exit 6 (a mount answers EACCES to new opens meanwhile)
    #[arg(
        long,
        global = true,
        env = "ENCIMG_KMS_TIMEOUT",
        default_value = "10",
        value_name = "SECS",
        value_parser = parse_timeout
    )]
    pub kms_timeout: f64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the store (directories, root key, key store); with --system, a system store
    /// (root only; default /var/lib/encimg) that `encimg serve` serves to the host's users
    Init {},
    /// Serve a system store (root): each account's mount at MOUNTPOINT/USER, and the
    /// socket through which `encimg --system COMMAND` runs for its caller
    Serve {
        /// Where the accounts' mounts go
        #[arg(long, value_name = "DIR", default_value = crate::account::DEFAULT_MOUNTPOINT)]
        mountpoint: PathBuf,
        /// The socket clients connect to
        #[arg(long, value_name = "PATH", env = "ENCIMG_SOCKET", default_value = crate::account::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Bound of each account mount's plaintext sector cache
        #[arg(long, value_name = "SIZE", default_value = "256M")]
        cache_size: String,
    },
    /// Share an image with other accounts of a system store (`--with USER…`), or, without
    /// `--with`, list whom it is shared with
    Share {
        /// images/NAME
        image: String,
        /// Users to share it with
        #[arg(long, value_name = "USER", num_args = 1..)]
        with: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop sharing an image with other accounts
    Unshare {
        /// images/NAME
        image: String,
        /// Users to stop sharing it with
        #[arg(long, value_name = "USER", num_args = 1.., required = true)]
        with: Vec<String>,
    },
    /// Manage customer master keys
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Manage regions: places with their own storage location and key service
    #[command(subcommand)]
    Region(regions::RegionCommand),
    /// Import a disk image (raw, qcow2, VMDK, VHD or VHDX, told by its content) or a block
    /// device as an image or disk
    Import {
        /// The file to import
        file: PathBuf,
        /// Destination: images/NAME, disks/NAME or snapshots/NAME
        res: String,
        /// Encrypt the imported resource
        #[arg(long)]
        encrypt: bool,
        /// CMK to encrypt under (id or alias/NAME; implies --encrypt) [default: the service key]
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Sector size of the encrypted payload
        #[arg(long, value_parser = ["512", "4096"], value_name = "512|4096")]
        sector_size: Option<String>,
        /// The file's format [default: told by its content]; `raw` takes a disk whose first
        /// sector a guest wrote an image header into as the raw disk it is
        #[arg(long, value_parser = ["raw", "qcow2", "vmdk", "vhd", "vhdx"])]
        format: Option<String>,
    },
    /// Create a disk: blank (--size), or from an image or a snapshot (--from)
    Create {
        /// disks/NAME
        res: String,
        /// Size of a blank disk (K, M, G, T suffixes: powers of 1024)
        #[arg(
            long,
            value_name = "SIZE",
            conflicts_with = "from",
            required_unless_present = "from"
        )]
        size: Option<String>,
        /// images/NAME or snapshots/NAME
        #[arg(long, value_name = "RES")]
        from: Option<String>,
        /// Encrypt (blank disks; disks from unencrypted snapshots)
        #[arg(long)]
        encrypt: bool,
        /// CMK to encrypt under (implies --encrypt)
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Sector size of a new encrypted blank disk
        #[arg(long, value_parser = ["512", "4096"], value_name = "512|4096")]
        sector_size: Option<String>,
    },
    /// Snapshot a disk (same encryption, CMK and data key)
    Snapshot {
        /// disks/NAME
        disk: String,
        /// snapshots/NAME
        snapshot: String,
    },
    /// Copy a resource (new data key when the key changes; encrypted to unencrypted is refused)
    Copy {
        src: String,
        dst: String,
        /// Encrypt an unencrypted source
        #[arg(long)]
        encrypt: bool,
        /// CMK for the copy: a different key means a new data key and full re-encryption
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Ask for an unencrypted copy (refused for encrypted sources)
        #[arg(long)]
        unencrypted: bool,
        /// Copy into these regions (up to 5, comma-separated), each with a new data key
        /// under --key resolved there, or that region's service key
        #[arg(long, value_name = "R1[,R2…]", value_delimiter = ',')]
        to_region: Vec<String>,
    },
    /// Change the CMK of an encrypted resource: rewrap (default) or re-encrypt
    Rekey {
        res: String,
        /// The new CMK (the same key rewraps under its newest version)
        #[arg(long, value_name = "KEY")]
        key: String,
        /// New data key, every sector re-encrypted (needed to change the key spec)
        #[arg(long)]
        reencrypt: bool,
    },
    /// Describe a resource
    Info {
        res: String,
        #[arg(long)]
        json: bool,
    },
    /// List resources
    List {
        /// images, disks or snapshots
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Export an unencrypted resource to a raw or qcow2 file
    Export {
        res: String,
        file: PathBuf,
        /// Format of the exported file
        #[arg(long, value_parser = ["raw", "qcow2"], default_value = "raw")]
        format: String,
    },
    /// Delete a resource
    Delete { res: String },
    /// Mount the store: images/, disks/, snapshots/ as plaintext files, and .control/
    Mount(mount::MountArgs),
    /// Unmount a mounted store (plain umount and fusermount3 -u work too)
    Umount(mount::UmountArgs),
    /// Jobs run by a mount's control files
    #[command(subcommand)]
    Job(JobCommand),
    /// Print a shell completion script (bash, zsh or fish)
    Completions {
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Write the man pages (encimg.1 and one per subcommand) into a directory
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a resource's data key in hex (for cryptsetup/OpenSSL interop and recovery)
    Dek {
        res: String,
        /// Confirm that the data key may be printed
        #[arg(long)]
        reveal: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// List jobs: id, op, source, destination, state, percent, bytes, error
    List {
        #[arg(long)]
        json: bool,
    },
    /// Wait for a job (or, without ID, every running job) to end; exits non-zero if one
    /// failed
    Wait { id: Option<String> },
    /// Stop a job the mount is running (a copy or snapshot; a rekey is not stopped): it ends
    /// `cancelled`, and nothing is left under its destination name
    Cancel { id: String },
}

impl Cli {
    /// The store's home directory (`--store`, `ENCIMG_STORE`, else the default).
    pub fn home(&self) -> PathBuf {
        self.store
            .clone()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(default_store_dir)
    }
}

/// The command in a few words, for errors from the operating system ("import a.raw
/// images/a: writing …: No space left on device").
fn describe(c: &Command) -> String {
    match c {
        Command::Init { .. } => "init".into(),
        Command::Serve { .. } => "serve".into(),
        Command::Share { image, .. } => format!("share {image}"),
        Command::Unshare { image, .. } => format!("unshare {image}"),
        Command::Key(_) => "key".into(),
        Command::Region(_) => "region".into(),
        Command::Import { file, res, .. } => format!("import {} {res}", file.display()),
        Command::Create { res, .. } => format!("create {res}"),
        Command::Snapshot { disk, snapshot } => format!("snapshot {disk} {snapshot}"),
        Command::Copy { src, dst, .. } => format!("copy {src} {dst}"),
        Command::Rekey { res, .. } => format!("rekey {res}"),
        Command::Info { res, .. } => format!("info {res}"),
        Command::List { .. } => "list".into(),
        Command::Export { res, file, .. } => format!("export {res} {}", file.display()),
        Command::Delete { res } => format!("delete {res}"),
        Command::Mount(a) => format!("mount {}", a.mountpoint.display()),
        Command::Umount(a) => format!("umount {}", a.mountpoint.display()),
        Command::Job(_) => "job".into(),
        Command::Dek { res, .. } => format!("dek {res}"),
        Command::Completions { .. } => "completions".into(),
        Command::Man { dir } => format!("man --dir {}", dir.display()),
    }
}

/// Run a parsed command line. Errors from the operating system (I/O, space, permissions)
/// are prefixed with the command, so the line says which operation failed on which path.
pub fn run(cli: Cli) -> Result<()> {
    let what = describe(&cli.command);
    run_command(cli).map_err(|e| {
        use crate::error::ErrorKind::{Denied, Io, NoSpace, ReadOnly};
        // Messages that already say what could not be done ("cannot mount at …") stand alone.
        let said = e.message.starts_with(&what) || e.message.starts_with("cannot ");
        if matches!(e.kind, Io | NoSpace | Denied | ReadOnly) && !said {
            e.context(what)
        } else {
            e
        }
    })
}

fn parse_timeout(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.001..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0.001 to 3600"
        )),
    }
}

fn run_command(cli: Cli) -> Result<()> {
    crate::kms::service::set_timeout(std::time::Duration::from_secs_f64(cli.kms_timeout));
    if let Some(f) = &cli.passphrase_file {
        crate::sys::secret::read_passphrase_file(f)?;
    }
    if cli.system && matches!(cli.command, Command::Init {}) {
        let dir = cli
            .store
            .clone()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| crate::account::DEFAULT_SYSTEM_STORE.into());
        if crate::account::init_system(&dir)? {
            println!("initialized system store {}", dir.display());
        } else {
            println!("system store {} already initialized", dir.display());
        }
        return Ok(());
    }
    if cli.system {
        return remote::run(&cli);
    }
    match &cli.command {
        Command::Completions { shell } => return docs::completions(*shell),
        Command::Man { dir } => {
            let n = docs::man_pages(dir)?;
            println!("{n} man pages in {}", dir.display());
            return Ok(());
        }
        _ => {}
    }
    let home = Store::at(&cli.home(), crate::region::LOCAL);
    if let Command::Region(r) = cli.command {
        return regions::run(&home, r);
    }
    let store = if cli.region == crate::region::LOCAL || matches!(cli.command, Command::Init { .. })
    {
        crate::region::validate_name(&cli.region)?;
        if cli.region != crate::region::LOCAL {
            return Err(crate::err!(
                InvalidInput,
                "init makes the store (region local); add other regions with `encimg region add`"
            ));
        }
        home
    } else {
        home.check()?;
        crate::region::Regions::new(&home.home).store(&cli.region)?
    };
    match cli.command {
        Command::Serve {
            mountpoint,
            socket,
            cache_size,
        } => crate::serve::serve(crate::serve::ServeConfig {
            system: cli
                .store
                .clone()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or_else(|| crate::account::DEFAULT_SYSTEM_STORE.into()),
            mountpoint,
            socket,
            cache_size,
        }),
        Command::Share { image, with, json } => sharing::share(&store, &image, &with, json),
        Command::Unshare { image, with } => sharing::unshare(&store, &image, &with),
        Command::Init {} => {
            let created = store.init()?;
            let sk = store.keys.update(|k| k.service_key())?;
            if created {
                println!(
                    "initialized store {} (service key {sk})",
                    store.root.display()
                );
            } else {
                println!(
                    "store {} already initialized (service key {sk})",
                    store.root.display()
                );
            }
            Ok(())
        }
        Command::Key(k) => keys::run(&store, k),
        Command::Mount(a) if store.remote.is_some() => {
            // Blocks are fetched as reads need them into STORE/regions/NAME/cache; writes
            // go back to the object store on fsync and close.
            let cache = store.mount_cache(a.object_cache.as_deref());
            cache.init()?;
            mount::run_mount(&cache, a)
        }
        Command::Mount(a) => mount::run_mount(&store, a),
        Command::Umount(a) => mount::run_umount(a),
        Command::Job(j) => {
            store.check()?;
            let jobs = crate::control::jobs::JobStore::new(&store.root);
            match j {
                JobCommand::List { json } => {
                    let list = jobs.list()?;
                    if json {
                        let v: Vec<_> = list.iter().map(|j| j.to_json()).collect();
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        for j in list {
                            println!("{}", j.line());
                        }
                    }
                    Ok(())
                }
                JobCommand::Cancel { id } => resources::cancel_job(&store, &jobs, &id),
                JobCommand::Wait { id } => {
                    let ids: Vec<String> = match id {
                        Some(id) => vec![id],
                        None => jobs
                            .list()?
                            .into_iter()
                            .filter(|j| !j.state.is_final())
                            .map(|j| j.id)
                            .collect(),
                    };
                    let mut first_err = None;
                    for id in ids {
                        let j = jobs.wait(&id)?;
                        println!("{}", j.line());
                        if j.state != crate::control::jobs::JobState::Done && first_err.is_none() {
                            // The kind of error the job failed with decides the exit code.
                            let kind = j.error_kind();
                            first_err = Some(crate::error::Error::new(
                                kind,
                                format!(
                                    "job {id} {}: {}",
                                    j.state.name(),
                                    j.error.as_deref().unwrap_or("no reason recorded")
                                ),
                            ));
                        }
                    }
                    first_err.map_or(Ok(()), Err)
                }
            }
        }
        other => resources::run(&store, other),
    }
}
