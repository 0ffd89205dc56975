//! The key service through the CLI (SPEC §2): ids, aliases, states, rotation, deletion
//! windows, BYOK, the service key, and their refusals.

mod common;
use common::*;

#[test]
fn service_key_exists_and_is_protected() {
    let e = Env::new();
    let keys = e.json(&["key", "list", "--json"]);
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let sk = &keys[0];
    assert_eq!(sk["origin"], "SERVICE");
    assert_eq!(sk["spec"], "AES_256");
    assert_eq!(sk["alias"], "alias/acs/ecs");
    let id = sk["id"].as_str().unwrap();
    assert!(id.starts_with("key-"));
    let err = e.fail(&["key", "disable", id], 5);
    assert!(err.contains("service key"), "{err}");
    e.fail(&["key", "schedule-deletion", "alias/acs/ecs"], 5);
    // A second init keeps the same service key.
    e.ok(&["init"]);
    assert_eq!(
        e.json(&["key", "list", "--json"]).as_array().unwrap().len(),
        1
    );
    // Another region has its own service key (regions are added, not invented by --region).
    e.fail(&["--region", "cn-hangzhou", "key", "list", "--json"], 2);
    e.ok(&["region", "add", "cn-hangzhou"]);
    let other = e.json(&["--region", "cn-hangzhou", "key", "list", "--json"]);
    assert_eq!(other.as_array().unwrap().len(), 1);
    assert_ne!(other[0]["id"], sk["id"]);
}

#[test]
fn create_describe_alias_tag_rotate() {
    let e = Env::new();
    let id = e.key("prod", "AES_256");
    assert!(id.starts_with("key-") && id.len() == 36, "{id}");
    let d = e.json(&["key", "describe", "alias/prod", "--json"]);
    for f in [
        "id",
        "alias",
        "spec",
        "origin",
        "state",
        "deletion_date",
        "versions",
        "tags",
    ] {
        assert!(d.get(f).is_some(), "describe lacks {f}: {d}");
    }
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["state"], "Enabled");
    assert_eq!(d["origin"], "KMS");
    assert_eq!(d["versions"].as_array().unwrap().len(), 1);
    assert!(d["deletion_date"].is_null());
    // Duplicate alias refused.
    e.fail(&["key", "create", "--alias", "prod"], 4);
    e.fail(&["key", "create", "--alias", "bad alias!"], 2);
    e.fail(&["key", "create", "--spec", "RSA_2048"], 2);
    e.fail(&["key", "describe", "alias/nope"], 3);
    e.fail(&["key", "describe", "key-0000"], 3);
    e.ok(&["key", "tag", &id, "env=prod", "team=storage"]);
    let d = e.json(&["key", "describe", &id, "--json"]);
    assert_eq!(d["tags"]["env"], "prod");
    assert_eq!(d["tags"]["team"], "storage");
    e.fail(&["key", "tag", &id, "novalue"], 2);
    e.ok(&["key", "rotate", "alias/prod"]);
    let d = e.json(&["key", "describe", &id, "--json"]);
    assert_eq!(d["versions"].as_array().unwrap().len(), 2);
    assert_eq!(d["current_version"], 2);
    let sm4 = e.key("cn", "SM4");
    let d = e.json(&["key", "describe", &sm4, "--json"]);
    assert_eq!(d["spec"], "SM4");
}

#[test]
fn rotation_keeps_old_versions_unwrapping() {
    let e = Env::new();
    let id = e.key("rot", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 1 << 20, 1);
    e.ok(&["import", src.to_str().unwrap(), "images/v1", "--key", &id]);
    assert_eq!(e.info("images/v1")["key_version"], 1);
    e.ok(&["key", "rotate", &id]);
    e.ok(&["import", src.to_str().unwrap(), "images/v2", "--key", &id]);
    assert_eq!(e.info("images/v2")["key_version"], 2);
    assert_eq!(read_plain(&e.store, "images/v1"), data);
    assert_eq!(read_plain(&e.store, "images/v2"), data);
    // Rewrap under the same key moves the image to the newest version, data key kept.
    let dek = e.dek("images/v1");
    e.ok(&["rekey", "images/v1", "--key", &id]);
    assert_eq!(e.info("images/v1")["key_version"], 2);
    assert_eq!(e.dek("images/v1"), dek);
}

#[test]
fn disable_and_enable() {
    let e = Env::new();
    let id = e.key("d", "AES_256");
    let src = e.path("a.raw");
    write_pattern(&src, 65536, 2);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--key", &id]);
    e.ok(&["import", src.to_str().unwrap(), "images/b", "--encrypt"]);
    e.ok(&["key", "disable", &id]);
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["state"],
        "Disabled"
    );
    let err = e.fail(&["dek", "images/a", "--reveal"], 6);
    assert!(err.contains(&id) && err.contains("Disabled"), "{err}");
    e.fail(&["copy", "images/a", "images/c"], 6);
    e.fail(
        &["import", src.to_str().unwrap(), "images/x", "--key", &id],
        6,
    );
    // Other resources are unaffected.
    e.ok(&["dek", "images/b", "--reveal"]);
    // Nothing half-made was left behind.
    assert!(e.fail(&["info", "images/c"], 3).contains("no resource"));
    e.ok(&["key", "enable", &id]);
    e.ok(&["dek", "images/a", "--reveal"]);
}

#[test]
fn deletion_window_usage_and_destruction() {
    let e = Env::new();
    let id = e.key("gone", "AES_256");
    let src = e.path("a.raw");
    write_pattern(&src, 65536, 3);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--key", &id]);
    e.ok(&["create", "disks/d", "--from", "images/a"]);
    let usage = e.json(&["key", "usage", &id, "--json"]);
    let used: Vec<&str> = usage["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(used, vec!["images/a", "disks/d"]);
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["tags"]["acs:ecs:disk-encryption"],
        "true"
    );
    let err = e.fail(&["key", "schedule-deletion", &id], 5);
    assert!(err.contains("images/a"), "{err}");
    e.fail(
        &["key", "schedule-deletion", &id, "--days", "6", "--force"],
        2,
    );
    e.fail(
        &["key", "schedule-deletion", &id, "--days", "31", "--force"],
        2,
    );
    e.ok(&["key", "schedule-deletion", &id, "--days", "7", "--force"]);
    let d = e.json(&["key", "describe", &id, "--json"]);
    assert_eq!(d["state"], "PendingDeletion");
    assert!(d["deletion_date"].is_string());
    let err = e.fail(&["dek", "images/a", "--reveal"], 6);
    assert!(err.contains("PendingDeletion"), "{err}");
    // Cancel: back to Disabled, then enable.
    e.ok(&["key", "cancel-deletion", &id]);
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["state"],
        "Disabled"
    );
    e.fail(&["key", "cancel-deletion", &id], 5);
    e.ok(&["key", "enable", &id]);
    e.ok(&["dek", "images/a", "--reveal"]);
    // Schedule again and let the date pass: material destroyed, data unrecoverable.
    e.ok(&["key", "schedule-deletion", &id, "--force"]);
    let later = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 31 * 86400)
        .to_string();
    let o = e
        .cmd()
        .env("ENCIMG_TEST_NOW", &later)
        .args(["dek", "images/a", "--reveal"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&o.stderr).contains("destroyed"));
    // Afterwards, even without the clock override, the key is gone for good.
    let err = e.fail(&["key", "describe", &id], 6);
    assert!(err.contains("destroyed"), "{err}");
    let ks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.store.join("keys/keystore.json")).unwrap())
            .unwrap();
    assert!(ks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["id"] != id.as_str()));
    assert!(ks["destroyed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == id.as_str()));
}

#[test]
fn byok_import() {
    let e = Env::new();
    let id = e
        .ok(&["key", "create", "--origin", "EXTERNAL", "--alias", "byok"])
        .trim()
        .to_string();
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["state"],
        "PendingImport"
    );
    let src = e.path("a.raw");
    let data = write_pattern(&src, 65536, 4);
    e.fail(
        &["import", src.to_str().unwrap(), "images/a", "--key", &id],
        6,
    );
    let short = e.path("short.bin");
    std::fs::write(&short, [7u8; 31]).unwrap();
    let err = e.fail(
        &["key", "import", &id, "--material", short.to_str().unwrap()],
        2,
    );
    assert!(err.contains("32"), "{err}");
    let m = e.path("m.bin");
    let material = pattern(32, 99);
    std::fs::write(&m, &material).unwrap();
    e.ok(&["key", "import", &id, "--material", m.to_str().unwrap()]);
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["state"],
        "Enabled"
    );
    e.fail(
        &["key", "import", &id, "--material", m.to_str().unwrap()],
        5,
    );
    e.ok(&[
        "import",
        src.to_str().unwrap(),
        "images/a",
        "--key",
        "alias/byok",
    ]);
    assert_eq!(read_plain(&e.store, "images/a"), data);
    // KMS keys take no material.
    let kms = e.key("kms", "AES_256");
    e.fail(
        &["key", "import", &kms, "--material", m.to_str().unwrap()],
        5,
    );
    // SM4 BYOK takes 16 bytes.
    let sid = e
        .ok(&["key", "create", "--origin", "EXTERNAL", "--spec", "SM4"])
        .trim()
        .to_string();
    e.fail(
        &["key", "import", &sid, "--material", m.to_str().unwrap()],
        2,
    );
    std::fs::write(&m, &material[..16]).unwrap();
    e.ok(&["key", "import", &sid, "--material", m.to_str().unwrap()]);
    // The imported material is never stored in plaintext.
    for entry in walk(&e.store) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            find(&bytes, &material).is_none(),
            "CMK material in {}",
            entry.display()
        );
        assert!(
            find(&bytes, &material[..16]).is_none(),
            "CMK material in {}",
            entry.display()
        );
    }
}

#[test]
fn concurrent_updates_are_not_lost() {
    let e = Env::new();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let mut c = e.cmd();
            c.args(["key", "create", "--alias", &format!("k{i}")]);
            c.spawn().unwrap()
        })
        .collect();
    for mut h in handles {
        assert!(h.wait().unwrap().success());
    }
    let keys = e.json(&["key", "list", "--json"]);
    assert_eq!(keys.as_array().unwrap().len(), 13);
}

#[test]
fn passphrase_root_key() {
    let e = Env::bare();
    let run = |pass: Option<&str>, args: &[&str]| {
        let mut c = e.cmd();
        if let Some(p) = pass {
            c.env("ENCIMG_PASSPHRASE", p);
        }
        c.args(args).output().unwrap()
    };
    assert!(run(Some("correct horse"), &["init"]).status.success());
    assert!(!e.store.join("keys/root.key").exists());
    assert!(
        run(Some("correct horse"), &["key", "create", "--alias", "p"])
            .status
            .success()
    );
    let o = run(Some("wrong"), &["key", "describe", "alias/p"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong passphrase"));
    let o = run(None, &["key", "describe", "alias/p"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ENCIMG_PASSPHRASE"));
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir).unwrap().flatten() {
        let p = ent.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `encimg key list | head -0`: the reader is gone before the first write.
    use std::os::unix::process::ExitStatusExt;
    let e = Env::new();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = e
        .cmd()
        .args(["key", "list", "--json"])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "stderr: {err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// `key schedule-deletion` looks for resources under the key, but a copy, create or import
/// under it is not in place until it ends: the job holds the key meanwhile, and the deletion
/// answers busy (it passed, and the copy then landed under a key pending deletion). Each
/// side is held here with the store's own lock, as the other holds it while it runs.
#[test]
fn a_key_a_job_is_making_a_resource_under_is_not_scheduled_for_deletion() {
    let e = Env::new();
    let id = e.key("victim", "AES_256");
    e.ok(&["create", "disks/d", "--size", "4M", "--encrypt"]);
    let store = encimg::store::Store::at(&e.store, "local");

    // A job is making a resource under the key: the deletion is refused, the key unchanged.
    let making = take_lock(|| store.hold_key(&id));
    let err = e.fail(
        &["key", "schedule-deletion", "alias/victim", "--days", "7"],
        7,
    );
    assert!(err.contains("in use by a job"), "{err}");
    assert_eq!(
        e.json(&["key", "describe", &id, "--json"])["state"],
        "Enabled"
    );
    drop(making);

    // A deletion is being decided: a copy under the key waits for it before wrapping.
    let deciding = take_lock(|| store.hold_key_alone(&id));
    let mut copy = e
        .cmd()
        .args(["copy", "disks/d", "disks/c", "--key", "alias/victim"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(copy.try_wait().unwrap().is_none(), "the copy did not wait");
    drop(deciding);
    assert!(copy.wait().unwrap().success());
    // In place now, it keeps the key from deletion the usual way.
    let err = e.fail(
        &["key", "schedule-deletion", "alias/victim", "--days", "7"],
        5,
    );
    assert!(err.contains("disks/c"), "{err}");
}
