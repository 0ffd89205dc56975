//! `encimg key …`

use std::path::PathBuf;

use clap::Subcommand;
use zeroize::Zeroizing;

use crate::err;
use crate::error::{IoContext, Result};
use crate::kms::{KeySpec, Origin};
use crate::store::Store;
use crate::sys;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a customer master key
    Create {
        #[arg(long, default_value = "AES_256", value_name = "AES_256|SM4")]
        spec: String,
        /// Alias, addressable as alias/NAME
        #[arg(long, value_name = "NAME")]
        alias: Option<String>,
        #[arg(long, default_value = "", value_name = "TEXT")]
        description: String,
        /// KMS (generated here) or EXTERNAL (bring your own material with `key import`)
        #[arg(long, default_value = "KMS", value_name = "KMS|EXTERNAL")]
        origin: String,
    },
    /// Import material into an EXTERNAL key (32 bytes for AES_256, 16 for SM4)
    Import {
        key: String,
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
    },
    /// List keys of the region
    List {
        #[arg(long)]
        json: bool,
    },
    /// Describe a key
    Describe {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// List the images, disks and snapshots that depend on a key
    Usage {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Enable a key
    Enable { key: String },
    /// Disable a key: resources under it cannot be opened until it is enabled again
    Disable { key: String },
    /// Add a new key version; new wraps use it, old versions still unwrap
    Rotate { key: String },
    /// Schedule the key's deletion after a waiting period (7-30 days)
    ScheduleDeletion {
        key: String,
        #[arg(long, default_value_t = 30, value_name = "N")]
        days: u32,
        /// Schedule even though resources use the key (their data becomes unrecoverable)
        #[arg(long)]
        force: bool,
    },
    /// Cancel a scheduled deletion (the key comes back Disabled)
    CancelDeletion { key: String },
    /// Set tags on a key
    Tag {
        key: String,
        /// K=V pairs
        #[arg(required = true, value_name = "K=V")]
        tags: Vec<String>,
    },
}

fn print_key(v: &serde_json::Value) {
    let f = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        x => x.to_string(),
    };
    println!("id:            {}", f("id"));
    println!("alias:         {}", f("alias"));
    println!("spec:          {}", f("spec"));
    println!("origin:        {}", f("origin"));
    println!("state:         {}", f("state"));
    if !v["deletion_date"].is_null() {
        println!("deletion date: {}", f("deletion_date"));
    }
    println!("description:   {}", f("description"));
    println!("created:       {}", f("created"));
    println!("region:        {}", f("region"));
    println!("key service:   {}", f("key_service"));
    if !v["service_state"].is_null() {
        println!("service state: {}", f("service_state"));
    }
    println!(
        "versions:      {} (current {})",
        v["versions"].as_array().map_or(0, |a| a.len()),
        f("current_version")
    );
    if let Some(tags) = v["tags"].as_object() {
        for (t, val) in tags {
            println!("tag:           {t}={}", val.as_str().unwrap_or_default());
        }
    }
}

/// BYOK material from a file: a regular file (never a FIFO, which would block, or a device),
/// read whole; a file of the wrong size is refused by the key store with the size it needs.
fn read_material(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match crate::sys::passed_file(path, false)? {
        Some(f) => f,
        None => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ctx(path.display())?,
    };
    let meta = f.metadata().ctx(path.display())?;
    if !meta.is_file() {
        return Err(err!(
            InvalidInput,
            "--material {} is not a regular file: give a file holding the key material",
            path.display()
        ));
    }
    if meta.len() > 1024 {
        return Err(err!(
            InvalidInput,
            "--material {} is {} bytes: key material is 16 or 32 bytes",
            path.display(),
            meta.len()
        ));
    }
    // Sized up front: no reallocation leaves a copy of the material behind.
    let mut out = Vec::with_capacity(1025);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, 1025), &mut out)
        .ctx(format_args!("reading {}", path.display()))?;
    Ok(out)
}

fn json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

impl KeyCommand {
    /// The file the command reads key material from, if any.
    pub fn material(&self) -> Option<&std::path::Path> {
        match self {
            KeyCommand::Import { material, .. } => Some(material),
            _ => None,
        }
    }
}

pub fn run(store: &Store, cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Create {
            spec,
            alias,
            description,
            origin,
        } => {
            let spec = KeySpec::parse(&spec)?;
            let origin = Origin::parse(&origin)?;
            store.init()?;
            let id = store
                .keys
                .update(|k| k.create(spec, alias.as_deref(), &description, origin))?;
            println!("{id}");
            Ok(())
        }
        KeyCommand::Import { key, material } => {
            store.check()?;
            let bytes = Zeroizing::new(read_material(&material)?);
            store.keys.update(|k| k.import(&key, &bytes))?;
            println!("imported material into {key}");
            Ok(())
        }
        KeyCommand::List { json: j } => {
            store.check()?;
            store.keys.read(|k| {
                if j {
                    json(&serde_json::Value::Array(k.describe_all()));
                } else {
                    println!(
                        "{:<36}  {:<24}  {:<7}  {:<8}  {:<15}  VER",
                        "ID", "ALIAS", "SPEC", "ORIGIN", "STATE"
                    );
                    for v in k.describe_all() {
                        println!(
                            "{:<36}  {:<24}  {:<7}  {:<8}  {:<15}  {}",
                            v["id"].as_str().unwrap_or_default(),
                            v["alias"].as_str().unwrap_or("-"),
                            v["spec"].as_str().unwrap_or_default(),
                            v["origin"].as_str().unwrap_or_default(),
                            v["state"].as_str().unwrap_or_default(),
                            v["current_version"]
                        );
                    }
                }
                Ok(())
            })
        }
        KeyCommand::Describe { key, json: j } => {
            store.check()?;
            store.keys.read(|k| {
                let v = k.describe_key(k.find(&key)?);
                if j {
                    json(&v);
                } else {
                    print_key(&v);
                }
                Ok(())
            })
        }
        KeyCommand::Usage { key, json: j } => {
            store.check()?;
            let id = store.keys.read(|k| Ok(k.find(&key)?.id.clone()))?;
            let usage = store.usage(&id)?;
            if j {
                json(&serde_json::json!({
                    "key_id": id,
                    "resources": usage.users.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                    "unreadable": usage.unreadable.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                }));
            } else {
                for r in &usage.users {
                    println!("{r}");
                }
                for r in &usage.unreadable {
                    println!("{r} (damaged: cannot tell)");
                }
            }
            Ok(())
        }
        KeyCommand::Enable { key } => {
            store.check()?;
            store.keys.update(|k| k.enable(&key))?;
            println!("{key}: Enabled");
            Ok(())
        }
        KeyCommand::Disable { key } => {
            store.check()?;
            store.keys.update(|k| k.disable(&key))?;
            println!("{key}: Disabled");
            Ok(())
        }
        KeyCommand::Rotate { key } => {
            store.check()?;
            let v = store.keys.update(|k| k.rotate(&key))?;
            println!("{key}: version {v}");
            Ok(())
        }
        KeyCommand::ScheduleDeletion { key, days, force } => {
            store.check()?;
            let date = store.schedule_key_deletion(&key, days, force)?;
            println!(
                "{key}: PendingDeletion, material destroyed on {}",
                sys::rfc3339(date)
            );
            Ok(())
        }
        KeyCommand::CancelDeletion { key } => {
            store.check()?;
            store.keys.update(|k| k.cancel_deletion(&key))?;
            println!("{key}: deletion cancelled (key is Disabled; enable it to use it)");
            Ok(())
        }
        KeyCommand::Tag { key, tags } => {
            store.check()?;
            let mut pairs = Vec::new();
            for t in tags {
                let (k, v) = t
                    .split_once('=')
                    .ok_or_else(|| err!(InvalidInput, "tag '{t}' is not K=V"))?;
                if k.is_empty() || k.len() > 128 || v.len() > 256 {
                    return Err(err!(
                        InvalidInput,
                        "tag '{t}': key must be 1-128 characters, value at most 256"
                    ));
                }
                pairs.push((k.to_string(), v.to_string()));
            }
            store.keys.update(|k| k.tag(&key, &pairs))?;
            Ok(())
        }
    }
}
