//! The on-disk format is pinned: the v1 header encoding byte for byte, and a checked-in
//! store (known root key) whose images must keep opening. A failure here means a format
//! version bump with a migration, never a silent change.

mod common;
use common::*;

use encimg::crypto::CipherKind;
use encimg::format::{Header, KeySlot, Kind, Reencrypt, HEADER_COPY_LEN};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn pinned_header() -> Header {
    Header {
        seq: 0x0102_0304_0506_0708,
        uuid: *b"0123456789abcdef",
        kind: Kind::Snapshot,
        xts_variant: 1,
        sector_size: 4096,
        size: 0x0000_0123_4567_8000,
        data_offset: 4 << 20,
        created: 1_795_305_600,
        key: KeySlot {
            cipher: CipherKind::AesXtsPlain64,
            key_id: "key-00112233445566778899aabbccddeeff".into(),
            key_version: 3,
            nonce: [0xab; 12],
            wrapped: (0..80).collect(),
        },
        reencrypt: Some(Reencrypt {
            checkpoint: 77,
            journal_sector: 76,
            journal_len: 4096,
            journal_crc: 0xdead_beef,
            next: KeySlot {
                cipher: CipherKind::Sm4XtsPlain64,
                key_id: "key-ffeeddccbbaa99887766554433221100".into(),
                key_version: 1,
                nonce: [0xcd; 12],
                wrapped: (100..148).collect(),
            },
        }),
    }
}

#[test]
fn header_v1_encoding_is_pinned() {
    let bytes = pinned_header().encode();
    // Offsets as docs/FORMAT.md gives them.
    assert_eq!(&bytes[0..8], b"ENCIMG\0\x01");
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1);
    assert_eq!(bytes[16..24], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&bytes[24..40], b"0123456789abcdef");
    assert_eq!(bytes[40], 3);
    assert_eq!(bytes[41], 1);
    assert_eq!(bytes[44..48], 4096u32.to_le_bytes());
    assert_eq!(bytes[56..64], (4u64 << 20).to_le_bytes());
    assert_eq!(bytes[72], 1); // slot 0 cipher
    assert_eq!(bytes[74..76], 80u16.to_le_bytes());
    assert_eq!(bytes[76..80], 3u32.to_le_bytes());
    assert_eq!(&bytes[80..84], b"key-");
    assert_eq!(bytes[144..156], [0xab; 12]);
    assert_eq!(bytes[156], 0);
    assert_eq!(bytes[256], 1);
    assert_eq!(bytes[264..272], 77u64.to_le_bytes());
    assert_eq!(bytes[288], 2); // slot 1 cipher
    let crc = crc32fast::hash(&bytes[..4092]);
    assert_eq!(bytes[4092..], crc.to_le_bytes());
    let pinned = std::fs::read_to_string(fixtures().join("header-v1.hex")).unwrap();
    let pinned = hex::decode(pinned.split_whitespace().collect::<String>()).unwrap();
    assert_eq!(pinned.len(), HEADER_COPY_LEN);
    assert!(
        pinned == bytes,
        "format version bump required: the v1 header encoding changed (tests/fixtures/header-v1.hex)"
    );
    assert_eq!(Header::decode(&pinned).unwrap(), pinned_header());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for ent in std::fs::read_dir(from).unwrap().flatten() {
        let p = ent.path();
        let t = to.join(ent.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// (resource, plaintext length, pattern seed, data key hex) of the fixture store.
fn expected() -> Vec<(String, usize, u64, String)> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("store-v1.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["res"].as_str().unwrap().to_string(),
                r["len"].as_u64().unwrap() as usize,
                r["seed"].as_u64().unwrap(),
                r["dek"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn fixture_store_v1_keeps_opening() {
    let e = Env::bare();
    copy_dir(&fixtures().join("store-v1"), &e.store);
    // git does not keep modes: the store wants its root key and directory private (it refuses
    // a root key others can read, and warns about a store directory they can enter).
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [("keys/root.key", 0o600), ("", 0o700)] {
        std::fs::set_permissions(e.store.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let list = expected();
    assert!(list.len() >= 2);
    for (res, len, seed, dek) in list {
        assert_eq!(hex::encode(e.dek(&res)), dek, "{res}: data key changed");
        assert!(
            read_plain(&e.store, &res) == pattern(len, seed),
            "{res}: plaintext changed"
        );
    }
    // The deliberately broken image: both header copies damaged.
    let err = e.fail(&["info", "images/broken"], 8);
    assert!(err.contains("header"), "{err}");

    // A store from before regions gains them without moving anything: its resources stay
    // where they are (region local), and copy out to the new region.
    e.ok(&["region", "add", "eu-1"]);
    let (res, len, seed, dek) = expected().remove(0);
    let before = e.info(&res);
    assert_eq!(before["region"], "local");
    e.ok(&["copy", &res, &res, "--to-region", "eu-1"]);
    assert_eq!(e.info(&res)["file"], before["file"]);
    assert_eq!(hex::encode(e.dek(&res)), dek);
    let s = encimg::store::Store::at(&e.store, "local")
        .region_store("eu-1")
        .unwrap();
    let r = encimg::store::ResPath::parse(&res).unwrap();
    let v = s.open_volume(&r, false).unwrap();
    let mut back = vec![0u8; len];
    v.read_at(&mut back, 0).unwrap();
    assert!(back == pattern(len, seed));
}

/// The store layout with regions is pinned too: `regions.json` (format 1, each region's
/// name, location, key service and creation time) and each region's directory laid out as
/// a store of its own (docs/FORMAT.md, "Store layout").
#[test]
fn store_layout_with_regions_is_pinned() {
    let e = Env::new();
    let loc = e.path("eu");
    e.ok(&["region", "add", "eu-1", "--location", loc.to_str().unwrap()]);
    e.ok(&["region", "add", "ap-2"]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.store.join("regions.json")).unwrap()).unwrap();
    assert_eq!(v["format"], 1, "format version bump required");
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    let mut keys: Vec<&str> = regions[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["created", "kms", "location", "name"],
        "format version bump required"
    );
    assert_eq!(regions[0]["name"], "eu-1");
    assert_eq!(regions[0]["location"], loc.to_str().unwrap());
    assert_eq!(regions[0]["kms"], "local");
    assert_eq!(
        regions[1]["location"],
        e.store.join("regions/ap-2").to_str().unwrap()
    );
    for dir in [loc.clone(), e.store.join("regions/ap-2"), e.store.clone()] {
        for d in [
            "images",
            "disks",
            "snapshots",
            "keys",
            "locks",
            "tmp",
            "jobs",
        ] {
            assert!(dir.join(d).is_dir(), "{}/{d}", dir.display());
        }
        for f in ["keys/keystore.json", "keys/root.key"] {
            assert!(dir.join(f).is_file(), "{}/{f}", dir.display());
        }
    }
    // Each region's key store names its own region on every key.
    let ks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(loc.join("keys/keystore.json")).unwrap()).unwrap();
    assert!(ks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["region"] == "eu-1"));
}

/// Regenerate the fixtures (only when the format version is bumped):
/// `ENCIMG_WRITE_FIXTURES=1 cargo test --test format write_fixtures -- --ignored`
#[test]
#[ignore]
fn write_fixtures() {
    if std::env::var_os("ENCIMG_WRITE_FIXTURES").is_none() {
        return;
    }
    let dir = fixtures();
    std::fs::create_dir_all(&dir).unwrap();
    let h = hex::encode(pinned_header().encode());
    let lines: Vec<&str> = (0..h.len()).step_by(64).map(|i| &h[i..i + 64]).collect();
    std::fs::write(dir.join("header-v1.hex"), lines.join("\n") + "\n").unwrap();
    let store = dir.join("store-v1");
    let _ = std::fs::remove_dir_all(&store);
    let e = Env {
        dir: tempfile::tempdir().unwrap(),
        store: store.clone(),
        vars: Vec::new(),
    };
    e.ok(&["init"]);
    let sm4 = e.key("fixture-sm4", "SM4");
    let mut out = Vec::new();
    for (res, len, seed, args) in [
        (
            "images/aes",
            200_000usize,
            1u64,
            vec!["--encrypt", "--sector-size", "4096"],
        ),
        (
            "images/sm4",
            70_000,
            2,
            vec!["--key", sm4.as_str(), "--sector-size", "512"],
        ),
        ("images/broken", 10_000, 3, vec!["--encrypt"]),
    ] {
        let src = e.path("src.raw");
        write_pattern(&src, len, seed);
        let mut a = vec!["import", src.to_str().unwrap(), res];
        a.extend(args);
        e.ok(&a);
        if res == "images/broken" {
            let f = store.join("images/broken.eimg");
            let mut b = std::fs::read(&f).unwrap();
            b[40] = 0xee;
            b[4096 + 4092] ^= 1;
            std::fs::write(&f, b).unwrap();
            continue;
        }
        out.push(serde_json::json!({"res": res, "len": len, "seed": seed, "dek": hex::encode(e.dek(res))}));
    }
    for d in ["locks", "tmp", "jobs"] {
        let _ = std::fs::remove_dir_all(store.join(d));
    }
    std::fs::write(
        dir.join("store-v1.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}
