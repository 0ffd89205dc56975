//! `encimg share` and `unshare`: an account of a system store shares an image with others.

use crate::account::{self, Account, User};
use crate::err;
use crate::error::Result;
use crate::format::Kind;
use crate::kms::Origin;
use crate::store::{ResPath, Store};

fn account_of(store: &Store) -> Result<Account> {
    Account::of_store_dir(&store.root).ok_or_else(|| {
        err!(
            InvalidInput,
            "sharing is between the accounts of a system store: use `encimg --system share …`"
        )
    })
}

fn image(store: &Store, image: &str) -> Result<ResPath> {
    let r = ResPath::parse(image)?;
    if r.kind != Kind::Image {
        return Err(err!(InvalidInput, "only images are shared: {r} is not one"));
    }
    store.info(&r)?;
    Ok(r)
}

pub fn share(store: &Store, img: &str, with: &[String], json: bool) -> Result<()> {
    let acct = account_of(store)?;
    let r = image(store, img)?;
    if with.is_empty() {
        let users: Vec<String> = account::shares(&acct.system)?
            .into_iter()
            .find(|s| s.owner == acct.name && s.image == r.name)
            .map(|s| s.with)
            .unwrap_or_default();
        if json {
            let v = serde_json::json!({"image": r.to_string(), "shared_with": users});
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            for u in users {
                println!("{u}");
            }
        }
        return Ok(());
    }
    if let Some(h) = store.info(&r)?.header {
        let origin = store.keys.read(|k| Ok(k.find(&h.key.key_id)?.origin))?;
        if origin == Origin::Service {
            return Err(err!(
                Refused,
                "{r} is encrypted under the service key, which cannot be shared: copy it under a CMK first (encimg copy {r} images/{}-cmk --key alias/KEY), then share the copy",
                r.name
            ));
        }
    }
    for u in with {
        if User::by_name(u).is_none() {
            return Err(err!(NotFound, "no user '{u}' on this host"));
        }
        if *u == acct.name {
            return Err(err!(InvalidInput, "{u} owns {r}: no need to share it"));
        }
    }
    account::update_shares(&acct.system, |shares| {
        let i = match shares
            .iter()
            .position(|s| s.owner == acct.name && s.image == r.name)
        {
            Some(i) => i,
            None => {
                shares.push(account::Share {
                    owner: acct.name.clone(),
                    image: r.name.clone(),
                    with: Vec::new(),
                });
                shares.len() - 1
            }
        };
        for u in with {
            if !shares[i].with.contains(u) {
                shares[i].with.push(u.clone());
            }
        }
        Ok(())
    })?;
    acct.audit(&format!("shared {r} with {}", with.join(", ")));
    println!("{r} shared with {}", with.join(", "));
    Ok(())
}

pub fn unshare(store: &Store, img: &str, with: &[String]) -> Result<()> {
    let acct = account_of(store)?;
    let r = image(store, img)?;
    account::update_shares(&acct.system, |shares| {
        for s in shares
            .iter_mut()
            .filter(|s| s.owner == acct.name && s.image == r.name)
        {
            s.with.retain(|u| !with.contains(u));
        }
        Ok(())
    })?;
    acct.audit(&format!("unshared {r} from {}", with.join(", ")));
    println!("{r} no longer shared with {}", with.join(", "));
    Ok(())
}

/// Forget every share of an image its owner deleted.
pub fn forget(store: &Store, r: &ResPath) {
    if let Some(acct) = Account::of_store_dir(&store.root) {
        let _ = account::update_shares(&acct.system, |shares| {
            shares.retain(|s| !(s.owner == acct.name && s.image == r.name));
            Ok(())
        });
    }
}
