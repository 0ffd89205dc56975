//! `encimg region …`

use clap::Subcommand;

use crate::error::Result;
use crate::region::Regions;
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// Add a region: a place with its own storage location and key service
    Add {
        /// Region name (1-32 of a-z 0-9 -)
        name: String,
        /// Directory holding the region's resources and key store [default: STORE/regions/NAME]
        #[arg(long, value_name = "DIR")]
        location: Option<String>,
        /// Key service holding the region's CMKs
        #[arg(long, value_name = "URI", default_value = "local")]
        kms: String,
    },
    /// List regions
    List {
        #[arg(long)]
        json: bool,
    },
    /// Describe a region: location, key service, what it holds
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a region (refused while it holds resources or keys)
    Remove { name: String },
}

impl RegionCommand {
    /// Whether the command is a query, or an `add` with the default location and the local
    /// key service: what an account may ask of a system store.
    pub fn is_plain_add_or_query(&self) -> bool {
        match self {
            RegionCommand::Add { location, kms, .. } => location.is_none() && kms == "local",
            _ => true,
        }
    }
}

/// A region's description with what it holds.
fn describe(regions: &Regions, r: &crate::region::Region) -> serde_json::Value {
    let mut v = r.to_json();
    if let Ok(store) = regions.store(&r.name) {
        let resources = store.list(None).map(|l| l.len()).ok();
        let keys = store.keys.read(|k| Ok(k.list().count())).ok();
        v["resources"] = serde_json::json!(resources);
        v["keys"] = serde_json::json!(keys);
    }
    v
}

pub fn run(home: &Store, cmd: RegionCommand) -> Result<()> {
    home.check()?;
    let regions = Regions::new(&home.home);
    match cmd {
        RegionCommand::Add {
            name,
            location,
            kms,
        } => {
            let r = regions.add(&name, location.as_deref(), Some(&kms))?;
            println!(
                "region {} at {} (key service {})",
                r.name,
                r.location.uri(),
                r.kms.uri()
            );
            Ok(())
        }
        RegionCommand::List { json } => {
            let list = regions.list()?;
            if json {
                let v: Vec<_> = list.iter().map(|r| describe(&regions, r)).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("{:<16}  {:<10}  LOCATION", "REGION", "KMS");
                for r in list {
                    println!("{:<16}  {:<10}  {}", r.name, r.kms.uri(), r.location.uri());
                }
            }
            Ok(())
        }
        RegionCommand::Describe { name, json } => {
            let r = regions.get(&name)?;
            let v = describe(&regions, &r);
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    let s = match val {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    println!("{k:<10} {s}");
                }
            }
            Ok(())
        }
        RegionCommand::Remove { name } => {
            regions.remove(&name)?;
            println!("removed region {name}");
            Ok(())
        }
    }
}
