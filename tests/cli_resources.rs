//! Resources through the CLI (SPEC §3, §4, §6): import, create, snapshot, the copy matrix,
//! rekey, export, delete, info, list, dek, and the cryptsetup/OpenSSL interop recipe.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn payload(e: &Env, res: &str) -> Vec<u8> {
    let info = e.info(res);
    let f = std::fs::read(info["file"].as_str().unwrap()).unwrap();
    f[info["data_offset"].as_u64().unwrap() as usize..].to_vec()
}

#[test]
fn import_info_list_export_roundtrip() {
    let e = Env::new();
    let src = e.path("a.raw");
    let data = write_pattern(&src, 3 * 1024 * 1024 + 777, 10);
    e.ok(&["import", src.to_str().unwrap(), "images/plain"]);
    e.ok(&["import", src.to_str().unwrap(), "images/enc", "--encrypt"]);
    e.ok(&[
        "import",
        src.to_str().unwrap(),
        "disks/small",
        "--encrypt",
        "--sector-size",
        "512",
    ]);
    let i = e.info("images/enc");
    for f in [
        "path",
        "kind",
        "name",
        "size",
        "encrypted",
        "cipher",
        "key_id",
        "key_version",
        "sector_size",
        "data_offset",
        "uuid",
        "file",
    ] {
        assert!(i.get(f).is_some(), "info lacks {f}: {i}");
    }
    assert_eq!(i["path"], "images/enc");
    assert_eq!(i["kind"], "image");
    assert_eq!(i["size"], data.len() as u64);
    assert_eq!(i["encrypted"], true);
    assert_eq!(i["cipher"], "aes-xts-plain64");
    assert_eq!(i["sector_size"], 4096);
    assert_eq!(i["data_offset"].as_u64().unwrap() % (1 << 20), 0);
    assert_eq!(e.info("disks/small")["sector_size"], 512);
    let p = e.info("images/plain");
    assert_eq!(p["encrypted"], false);
    assert!(p["cipher"].is_null());
    // An unencrypted resource is a plain raw file.
    assert_eq!(std::fs::read(p["file"].as_str().unwrap()).unwrap(), data);
    assert_eq!(read_plain(&e.store, "images/enc"), data);
    assert_eq!(read_plain(&e.store, "disks/small"), data);
    // The ciphertext does not contain the plaintext.
    let ct = payload(&e, "images/enc");
    assert!(ct.windows(64).all(|w| w != &data[4096..4160]));
    let l = e.json(&["list", "--json"]);
    let paths: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["images/enc", "images/plain", "disks/small"]);
    let l = e.json(&["list", "images", "--json"]);
    assert_eq!(l.as_array().unwrap().len(), 2);
    assert!(e.ok(&["list"]).contains("images/enc"));
    // Export: unencrypted only.
    let out = e.path("out.raw");
    e.ok(&["export", "images/plain", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    e.fail(&["export", "images/plain", out.to_str().unwrap()], 4);
    let out2 = e.path("out2.raw");
    let err = e.fail(&["export", "images/enc", out2.to_str().unwrap()], 5);
    assert!(err.contains("encrypted"), "{err}");
    assert!(!out2.exists());
    // Existing destination, bad names, bad kinds, missing sources.
    e.fail(&["import", src.to_str().unwrap(), "images/plain"], 4);
    e.fail(&["import", src.to_str().unwrap(), "images/bad name"], 2);
    e.fail(&["import", src.to_str().unwrap(), "volumes/x"], 2);
    e.fail(&["import", src.to_str().unwrap(), "images/.."], 2);
    e.fail(
        &["import", &e.path("missing").to_string_lossy(), "images/m"],
        3,
    );
    e.fail(&["info", "images/nope"], 3);
    e.fail(
        &[
            "import",
            src.to_str().unwrap(),
            "images/x",
            "--key",
            "alias/none",
        ],
        3,
    );
}

#[test]
fn openssl_decrypts_what_encimg_wrote() {
    // The README's interop recipe (contrib/xts-decrypt.py): given `dek --reveal`, an
    // independent XTS (OpenSSL through Python's cryptography; SM4-XTS on OpenSSL's SM4)
    // decrypts every sector with tweak = sector number, for each cipher and sector size.
    let e = Env::new();
    e.key("sm", "SM4");
    let src = e.path("a.raw");
    let data = write_pattern(&src, (1 << 20) + 777, 11);
    for (res, ss, key) in [
        ("images/s4k", "4096", None),
        ("images/s512", "512", None),
        ("images/sm4k", "4096", Some("alias/sm")),
        ("images/sm512", "512", Some("alias/sm")),
    ] {
        let mut args = vec!["import", src.to_str().unwrap(), res, "--sector-size", ss];
        match key {
            Some(k) => args.extend(["--key", k]),
            None => args.push("--encrypt"),
        }
        e.ok(&args);
        let i = e.info(res);
        let dek = e.dek(res);
        assert_eq!(dek.len(), if key.is_some() { 32 } else { 64 });
        let plain = openssl_decrypt_with(
            std::path::Path::new(i["file"].as_str().unwrap()),
            &dek,
            i["data_offset"].as_u64().unwrap(),
            i["sector_size"].as_u64().unwrap(),
            data.len() as u64,
            i["cipher"].as_str().unwrap(),
        );
        assert!(plain == data, "OpenSSL disagrees for {res}");
    }
    e.fail(&["dek", "images/s4k"], 2);
}

#[test]
fn blank_disks_are_sparse_and_read_zeros() {
    let e = Env::new();
    e.ok(&["create", "disks/big", "--size", "1T", "--encrypt"]);
    e.ok(&["create", "disks/rawbig", "--size", "1T"]);
    let i = e.info("disks/big");
    assert_eq!(i["size"], 1u64 << 40);
    let meta = std::fs::metadata(i["file"].as_str().unwrap()).unwrap();
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "blank 1 TiB disk uses {} bytes",
        meta.blocks() * 512
    );
    let s = encimg::store::Store::at(&e.store, "local");
    let v = s
        .open_volume(&encimg::store::ResPath::parse("disks/big").unwrap(), true)
        .unwrap();
    let mut buf = vec![1u8; 8192];
    v.read_at(&mut buf, 123 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    v.write_at(b"hello", (123 << 30) + 4094).unwrap();
    v.read_at(&mut buf, 123 << 30).unwrap();
    assert_eq!(&buf[4094..4099], b"hello");
    assert!(buf[..4094].iter().all(|&b| b == 0) && buf[4099..].iter().all(|&b| b == 0));
    e.fail(&["create", "disks/z", "--size", "0"], 2);
    e.fail(&["create", "disks/z", "--size", "12Q"], 2);
    e.fail(&["create", "images/z", "--size", "1M"], 2);
    e.fail(&["create", "disks/big", "--size", "1M"], 4);
}

#[test]
fn copy_matrix() {
    let e = Env::new();
    let other = e.key("other", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 2 * 1024 * 1024 + 4096, 12);
    e.ok(&["import", src.to_str().unwrap(), "images/plain"]);
    e.ok(&["import", src.to_str().unwrap(), "images/enc", "--encrypt"]);
    // unencrypted -> unencrypted: a plain copy.
    e.ok(&["copy", "images/plain", "images/plain2"]);
    assert_eq!(e.info("images/plain2")["encrypted"], false);
    assert_eq!(read_plain(&e.store, "images/plain2"), data);
    // unencrypted -> encrypted: a new data key under the chosen CMK.
    e.ok(&[
        "copy",
        "images/plain",
        "images/enc2",
        "--encrypt",
        "--key",
        "alias/other",
    ]);
    let i = e.info("images/enc2");
    assert_eq!(i["encrypted"], true);
    assert_eq!(i["key_id"], other.as_str());
    assert_eq!(read_plain(&e.store, "images/enc2"), data);
    assert_ne!(e.dek("images/enc2"), e.dek("images/enc"));
    // encrypted -> encrypted, key kept: same CMK and data key, ciphertext verbatim.
    e.ok(&["copy", "images/enc", "images/same"]);
    let (a, b) = (e.info("images/enc"), e.info("images/same"));
    assert_eq!(a["key_id"], b["key_id"]);
    assert_ne!(a["uuid"], b["uuid"]);
    assert_eq!(e.dek("images/enc"), e.dek("images/same"));
    assert!(payload(&e, "images/enc") == payload(&e, "images/same"));
    // encrypted -> encrypted, key replaced: a new data key, every sector re-encrypted.
    e.ok(&["copy", "images/enc", "images/rekeyed", "--key", &other]);
    assert_eq!(e.info("images/rekeyed")["key_id"], other.as_str());
    assert_ne!(e.dek("images/rekeyed"), e.dek("images/enc"));
    assert_eq!(read_plain(&e.store, "images/rekeyed"), data);
    // ...also to an SM4 key: the cipher follows the key spec.
    let sm4 = e.key("sm4", "SM4");
    e.ok(&["copy", "images/enc", "images/sm4", "--key", &sm4]);
    assert_eq!(e.info("images/sm4")["cipher"], "sm4-xts-plain64");
    assert_eq!(e.dek("images/sm4").len(), 32);
    assert_eq!(read_plain(&e.store, "images/sm4"), data);
    // encrypted -> unencrypted: refused, nothing left behind.
    let err = e.fail(&["copy", "images/enc", "images/leak", "--unencrypted"], 5);
    assert!(
        err.contains("encrypted images cannot be copied into unencrypted images"),
        "{err}"
    );
    e.fail(&["info", "images/leak"], 3);
    assert_eq!(std::fs::read_dir(e.store.join("tmp")).unwrap().count(), 0);
    // Other refusals.
    e.fail(&["copy", "images/enc", "images/same"], 4);
    e.fail(&["copy", "images/nope", "images/x"], 3);
    e.fail(&["copy", "images/enc", "images/enc"], 2);
    e.fail(
        &[
            "copy",
            "images/plain",
            "images/x",
            "--encrypt",
            "--unencrypted",
        ],
        2,
    );
    // Copies across kinds.
    e.ok(&["copy", "images/enc", "disks/fromcopy"]);
    assert_eq!(read_plain(&e.store, "disks/fromcopy"), data);
}

#[test]
fn disks_from_images_and_snapshots() {
    let e = Env::new();
    let k = e.key("k", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 1 << 20, 13);
    e.ok(&["import", src.to_str().unwrap(), "images/base", "--key", &k]);
    e.ok(&["import", src.to_str().unwrap(), "images/pbase"]);
    e.ok(&["create", "disks/d", "--from", "images/base"]);
    assert_eq!(e.info("disks/d")["key_id"], k.as_str());
    assert_eq!(e.dek("disks/d"), e.dek("images/base"));
    e.fail(
        &[
            "create",
            "disks/d2",
            "--from",
            "images/base",
            "--key",
            "alias/acs/ecs",
        ],
        5,
    );
    e.ok(&["create", "disks/p", "--from", "images/pbase"]);
    assert_eq!(e.info("disks/p")["encrypted"], false);
    // Change the disk, snapshot it: the snapshot holds the change, same key and data key.
    let s = encimg::store::Store::at(&e.store, "local");
    {
        let v = s
            .open_volume(&encimg::store::ResPath::parse("disks/d").unwrap(), true)
            .unwrap();
        v.write_at(b"changed", 100).unwrap();
        v.sync().unwrap();
    }
    e.ok(&["snapshot", "disks/d", "snapshots/s1"]);
    let mut want = data.clone();
    want[100..107].copy_from_slice(b"changed");
    assert_eq!(read_plain(&e.store, "snapshots/s1"), want);
    assert_eq!(e.dek("snapshots/s1"), e.dek("disks/d"));
    assert_eq!(e.info("snapshots/s1")["kind"], "snapshot");
    e.fail(&["snapshot", "images/base", "snapshots/x"], 2);
    e.fail(&["snapshot", "disks/d", "images/x"], 2);
    // Disk from snapshot: same as the snapshot.
    e.ok(&["create", "disks/r", "--from", "snapshots/s1"]);
    assert_eq!(e.dek("disks/r"), e.dek("disks/d"));
    assert_eq!(read_plain(&e.store, "disks/r"), want);
    // An unencrypted snapshot may be encrypted on the way.
    e.ok(&["snapshot", "disks/p", "snapshots/ps"]);
    e.ok(&["create", "disks/pe", "--from", "snapshots/ps", "--encrypt"]);
    assert_eq!(e.info("disks/pe")["encrypted"], true);
    assert_eq!(read_plain(&e.store, "disks/pe"), data);
    e.fail(&["create", "disks/x", "--from", "disks/d"], 2);
}

#[test]
fn rekey_rewrap_and_reencrypt() {
    let e = Env::new();
    let k1 = e.key("k1", "AES_256");
    let k2 = e.key("k2", "AES_256");
    let s = e.key("s", "SM4");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 5 * 1024 * 1024 + 512, 14);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--key", &k1]);
    let dek = e.dek("images/a");
    let ct = payload(&e, "images/a");
    // Rewrap: data key and every sector kept; only the header changes.
    e.ok(&["rekey", "images/a", "--key", "alias/k2"]);
    assert_eq!(e.info("images/a")["key_id"], k2.as_str());
    assert_eq!(e.dek("images/a"), dek);
    assert!(payload(&e, "images/a") == ct);
    // The old key no longer matters to it.
    e.ok(&["key", "disable", &k1]);
    assert_eq!(read_plain(&e.store, "images/a"), data);
    // Another spec needs re-encryption.
    let err = e.fail(&["rekey", "images/a", "--key", &s], 5);
    assert!(err.contains("re-encrypt"), "{err}");
    // Re-encrypt: new data key, every sector re-encrypted, data intact.
    e.ok(&["rekey", "images/a", "--key", &s, "--reencrypt"]);
    let i = e.info("images/a");
    assert_eq!(i["key_id"], s.as_str());
    assert_eq!(i["cipher"], "sm4-xts-plain64");
    assert!(i["reencrypt"].is_null());
    assert_ne!(e.dek("images/a"), dek);
    assert_eq!(read_plain(&e.store, "images/a"), data);
    e.ok(&["rekey", "images/a", "--key", &k2, "--reencrypt"]);
    assert_eq!(e.info("images/a")["cipher"], "aes-xts-plain64");
    assert_eq!(read_plain(&e.store, "images/a"), data);
    // Unencrypted resources have no key to change.
    e.ok(&["import", src.to_str().unwrap(), "images/p"]);
    e.fail(&["rekey", "images/p", "--key", &k2], 5);
    e.fail(&["rekey", "images/a", "--key", "alias/none"], 3);
}

#[test]
fn delete_and_store_permissions() {
    let e = Env::new();
    let src = e.path("a.raw");
    write_pattern(&src, 65536, 15);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["delete", "images/a"]);
    e.fail(&["delete", "images/a"], 3);
    e.fail(&["info", "images/a"], 3);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    // Held open (as a mount does): delete refused.
    let s = encimg::store::Store::at(&e.store, "local");
    let r = encimg::store::ResPath::parse("images/a").unwrap();
    let lock = encimg::sys::FileLock::try_shared(&s.open_lock_path(&r))
        .unwrap()
        .unwrap();
    let err = e.fail(&["delete", "images/a"], 7);
    assert!(err.contains("open"), "{err}");
    drop(lock);
    e.ok(&["delete", "images/a"]);
    e.ok(&["import", src.to_str().unwrap(), "images/b", "--encrypt"]);
    // Store files 0600, directories 0700.
    for p in walk(&e.store) {
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m & 0o077, 0, "{} has mode {m:o}", p.display());
    }
    assert_eq!(
        std::fs::metadata(&e.store).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn no_data_key_in_plaintext_anywhere() {
    let e = Env::new();
    let src = e.path("a.raw");
    write_pattern(&src, 1 << 20, 16);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["copy", "images/a", "disks/b", "--key", &e.key("x", "SM4")]);
    e.ok(&["rekey", "disks/b", "--key", "alias/x", "--reencrypt"]);
    for res in ["images/a", "disks/b"] {
        let dek = e.dek(res);
        for p in walk(&e.store).into_iter().filter(|p| p.is_file()) {
            let bytes = std::fs::read(&p).unwrap();
            for half in dek.chunks(16) {
                assert!(
                    !bytes.windows(16).any(|w| w == half),
                    "data key of {res} in {}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn help_everywhere() {
    let e = Env::new();
    for args in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["key", "--help"],
        vec!["key", "create", "--help"],
        vec!["key", "schedule-deletion", "--help"],
        vec!["import", "--help"],
        vec!["create", "--help"],
        vec!["copy", "--help"],
        vec!["rekey", "--help"],
        vec!["info", "--help"],
        vec!["list", "--help"],
        vec!["dek", "--help"],
    ] {
        let out = e.ok(&args);
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
    // Missing store: a clear error, not a panic.
    let bare = Env::bare();
    let err = bare.fail(&["list"], 3);
    assert!(err.contains("encimg init"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
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

/// A copy (snapshot, export, copy to regions) plans from the source as it finds it, then
/// holds it for reading. A rekey, or a delete and a new resource by the name, that ends
/// between the two changes what the plan was made from (the data key its header wraps):
/// the hold then answers busy. Before, the copy went on with the old header, and a snapshot
/// taken across a re-encryption held new ciphertext under the old key (garbage), exit 0.
#[test]
fn a_source_changed_between_plan_and_hold_is_busy_not_a_garbage_copy() {
    use encimg::store::{ResPath, Store};
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    e.ok(&["create", "disks/d", "--size", "4M", "--encrypt"]);
    let store = Store::at(&e.store, "local");
    let r = ResPath::parse("disks/d").unwrap();
    // Unchanged: held.
    let info = store.info(&r).unwrap();
    drop(store.lock_reading_as(&r, &info).unwrap());
    // Re-encrypted in between: busy.
    e.ok(&["rekey", "disks/d", "--key", &k2, "--reencrypt"]);
    let err = store.lock_reading_as(&r, &info).err().expect("busy");
    assert_eq!(err.kind, encimg::ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("run it again"), "{err}");
    // Deleted and made again (same size): busy.
    let info = store.info(&r).unwrap();
    e.ok(&["delete", "disks/d"]);
    e.ok(&["create", "disks/d", "--size", "4M", "--encrypt"]);
    let err = store.lock_reading_as(&r, &info).err().expect("busy");
    assert_eq!(err.kind, encimg::ErrorKind::Busy, "{err}");
    // And a copy through the CLI still works.
    e.ok(&["snapshot", "disks/d", "snapshots/s"]);
}

/// A snapshot or copy of a disk written meanwhile through the volume the copy is given (the
/// mount's own, as `.control/snapshot` and `.control/copy` give it) holds the disk as it was
/// at one instant: every sector whole, and no write without the writes made before it. One
/// writer sweeps a value up through sectors spread over the disk (so at any instant the
/// sweep reads k below some sector and k-1 from there up); another rewrites other sectors
/// whole. A copy read while they ran read the low sectors early and the high ones late.
#[test]
fn a_copy_of_a_disk_being_written_is_of_one_point_in_time() {
    use common::sweep::{Sweep, SECTOR};
    use encimg::store::{CopyOptions, NoProgress, ResPath, Store, Volume};
    const LEN: u64 = 16 << 20;
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let src = e.path("d.raw");
    write_pattern(&src, LEN as usize, 5);
    let store = Store::at(&e.store, "local");
    e.ok(&["region", "add", "far"]);
    let far = store.region_store("far").unwrap();
    let read = |v: &Volume, at: u64| {
        let mut b = vec![0u8; SECTOR];
        v.read_at(&mut b, at).unwrap();
        b
    };
    // An image written through its volume (a mount with --writable-images) and copied to
    // another region (disks do not cross regions) is frozen the same way.
    for (flags, name) in [
        (&["--encrypt"][..], "disks/enc"),
        (&[][..], "disks/plain"),
        (&["--encrypt"][..], "images/w"),
    ] {
        e.ok(&[&["import", src.to_str().unwrap(), name][..], flags].concat());
        let r = ResPath::parse(name).unwrap();
        let live = store.open_volume(&r, true).unwrap();
        let sweep = Sweep::new(LEN, 256 << 10);
        // Other sectors, rewritten whole (each a value of its own).
        let whole: Vec<u64> = sweep
            .offsets
            .iter()
            .map(|&a| a + 2 * SECTOR as u64)
            .collect();
        for &at in sweep.offsets.iter().chain(&whole) {
            live.write_at(&Sweep::sector(0), at).unwrap();
        }
        let copies: Vec<(&str, CopyOptions)> = match name {
            "images/w" => vec![(
                "images/far",
                CopyOptions {
                    to_regions: vec!["far".into()],
                    ..Default::default()
                },
            )],
            "disks/enc" => vec![
                ("snapshots/s", CopyOptions::default()),
                ("images/same-key", CopyOptions::default()),
                (
                    "images/new-key",
                    CopyOptions {
                        key: Some(k2.clone()),
                        ..Default::default()
                    },
                ),
            ],
            _ => vec![
                ("snapshots/s", CopyOptions::default()),
                (
                    "images/encrypted",
                    CopyOptions {
                        encrypt: true,
                        ..Default::default()
                    },
                ),
            ],
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                sweep.run(|b, at| {
                    live.write_at(b, at).unwrap();
                })
            });
            s.spawn(|| {
                let mut k = 1u64 << 40;
                while !sweep.stopped() {
                    for &at in whole.iter().rev() {
                        k += 1;
                        live.write_at(&Sweep::sector(k), at).unwrap();
                    }
                }
            });
            let _stop = sweep.stopper();
            for round in 0..8 {
                for (dst, opts) in &copies {
                    let d = ResPath::parse(dst).unwrap();
                    let before = sweep.done();
                    let at = if opts.to_regions.is_empty() {
                        &store
                    } else {
                        &far
                    };
                    // (Busy retried: a child another test forks holds this process's
                    // lock descriptors until it execs.)
                    take_lock(|| {
                        if !opts.to_regions.is_empty() {
                            let p = std::sync::Arc::new(NoProgress);
                            let out =
                                store.copy_to_regions(&r, &d, opts, &|_| p.clone(), Some(&live))?;
                            encimg::store::combine(&out)
                        } else if d.kind == encimg::format::Kind::Snapshot {
                            store.snapshot(&r, &d, &NoProgress, Some(&live))
                        } else {
                            store.copy_live(&r, &d, opts, &NoProgress, Some(&live))
                        }
                    });
                    let c = at.open_volume(&d, false).unwrap();
                    let ctx = format!("{name} → {dst}, round {round}");
                    sweep.check(before, &ctx, |o| read(&c, o));
                    for &o in &whole {
                        assert!(
                            Sweep::value(&read(&c, o)).is_some(),
                            "a torn sector at {o}: {ctx}"
                        );
                    }
                    drop(c);
                    take_lock(|| at.delete(&d));
                }
            }
        });
        assert!(sweep.done() > 8, "the writer hardly ran");
    }
}
