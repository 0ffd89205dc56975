//! An in-place re-encryption interrupted between any two of its durable steps leaves the
//! resource readable (old key below nothing, new key below the checkpoint), and resuming
//! finishes it. The interruption is injected through the step hook (a panic, which abandons
//! the volume exactly where the step stood).

mod common;
use common::*;

use encimg::kms::KeySpec;
use encimg::store::{NoProgress, RekeyMode, ResPath, Store};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[test]
fn interrupted_reencryption_is_readable_and_resumable() {
    let points = [
        "journal-written",
        "journal-recorded",
        "chunk-written",
        "checkpoint-advanced",
    ];
    let e = Env::new();
    let k2 = e.key("k2", "SM4");
    let src = e.path("a.raw");
    // 7 MiB + a bit: four journal chunks of 2 MiB, the last partial, and a trailing hole.
    let data = write_pattern(&src, 7 * 1024 * 1024 + 1536, 21);
    let store = Store::at(&e.store, "local");
    let mut n = 0;
    for chunk in 0..4 {
        for point in points {
            n += 1;
            let name = format!("disks/c{n}");
            e.ok(&[
                "import",
                src.to_str().unwrap(),
                &name,
                "--encrypt",
                "--sector-size",
                "512",
            ]);
            let r = ResPath::parse(&name).unwrap();
            let old_dek = e.dek(&name);
            let crashed = catch_unwind(AssertUnwindSafe(|| {
                let vol = store.open_volume(&r, true).unwrap();
                let seen = std::cell::Cell::new(0);
                let hook = |p: &str| {
                    if p == point {
                        if seen.get() == chunk {
                            panic!("injected crash at {p} of chunk {chunk}");
                        }
                        seen.set(seen.get() + 1);
                    }
                    Ok(())
                };
                store
                    .reencrypt(&vol, &r, &k2, KeySpec::Sm4, &NoProgress, &hook)
                    .unwrap();
            }));
            assert!(
                crashed.is_err(),
                "no crash injected at {point} of chunk {chunk}"
            );
            // Readable at once, with the old and the new key each where the checkpoint says.
            assert!(
                read_plain(&e.store, &name) == data,
                "{name}: unreadable after crash at {point}/{chunk}"
            );
            let info = e.info(&name);
            assert!(
                !info["reencrypt"].is_null(),
                "{name}: re-encryption state lost"
            );
            // Resume: the same request finishes it.
            store
                .rekey(&r, &k2, RekeyMode::Reencrypt, &NoProgress)
                .unwrap();
            let info = e.info(&name);
            assert!(info["reencrypt"].is_null());
            assert_eq!(info["cipher"], "sm4-xts-plain64");
            assert_ne!(e.dek(&name), old_dek);
            assert!(
                read_plain(&e.store, &name) == data,
                "{name}: wrong after resume"
            );
            e.ok(&["delete", &name]);
        }
    }
}

/// An encrypted resource `res` of 1 MiB imported from a pattern (`seed`), its backing file
/// with header copy A torn (bytes XORed), and the pattern.
fn with_copy_a_torn(e: &Env, res: &str, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let src = e.path("a.raw");
    let data = write_pattern(&src, 1 << 20, seed);
    e.ok(&["import", src.to_str().unwrap(), res, "--encrypt"]);
    let file = std::path::PathBuf::from(e.info(res)["file"].as_str().unwrap());
    tear(&file, 0);
    (file, data)
}

/// Tear header copy `copy` (0: A, 1: B) of an encrypted resource's backing file.
fn tear(file: &std::path::Path, copy: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    for b in &mut bytes[copy * 4096 + 100..copy * 4096 + 600] {
        *b ^= 0x5a;
    }
    std::fs::write(file, &bytes).unwrap();
}

#[test]
fn a_torn_header_copy_is_survived_and_full_damage_is_a_clear_error() {
    let e = Env::new();
    let (file, data) = with_copy_a_torn(&e, "images/a", 22);
    assert!(read_plain(&e.store, "images/a") == data);
    // Tear copy B too: a clear error, exit 8, no panic.
    tear(&file, 1);
    let err = e.fail(&["info", "images/a"], 8);
    assert!(err.contains("header"), "{err}");
    e.fail(&["dek", "images/a", "--reveal"], 8);
}

#[test]
fn a_wrapped_key_moved_to_another_header_is_rejected() {
    let e = Env::new();
    let src = e.path("a.raw");
    write_pattern(&src, 1 << 20, 23);
    e.ok(&["import", src.to_str().unwrap(), "images/a", "--encrypt"]);
    e.ok(&["import", src.to_str().unwrap(), "images/b", "--encrypt"]);
    let fa = std::path::PathBuf::from(e.info("images/a")["file"].as_str().unwrap());
    let fb = std::path::PathBuf::from(e.info("images/b")["file"].as_str().unwrap());
    let a = std::fs::File::open(&fa).unwrap();
    let (ha, _) = encimg::format::read_header(&a).unwrap();
    let b = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fb)
        .unwrap();
    let (mut hb, _) = encimg::format::read_header(&b).unwrap();
    // Same CMK, valid checksums: only the AEAD binding can tell.
    hb.key = ha.key.clone();
    encimg::format::write_header(&b, &mut hb).unwrap();
    let err = e.fail(&["dek", "images/b", "--reveal"], 8);
    assert!(err.contains("does not unwrap"), "{err}");
    // An edited size is caught the same way.
    let (mut ha2, _) = encimg::format::read_header(&a).unwrap();
    ha2.size += 4096;
    let a = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fa)
        .unwrap();
    encimg::format::write_header(&a, &mut ha2).unwrap();
    e.fail(&["dek", "images/a", "--reveal"], 8);
}

/// A write that comes as an in-place re-encryption finds nothing left to do (the rest of
/// the disk is a hole) waits until the new key is the only one. Let in between, it was
/// encrypted under the old key past the checkpoint, and the switch then made it garbage
/// (an fsync'd write lost; a mount's online re-encryption met it about one run in fifty).
#[test]
fn a_write_racing_the_end_of_a_reencryption_is_kept() {
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 3 << 20, 31);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    e.ok(&["import", src.to_str().unwrap(), "disks/r", "--encrypt"]);
    let r = ResPath::parse("disks/r").unwrap();
    let store = Store::at(&e.store, "local");
    let vol = store.open_volume(&r, true).unwrap();
    let late = vec![0x5au8; 64 << 10];
    let (go, wait) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|t| {
        let (vol, late) = (&vol, &late);
        let writer = t.spawn(move || {
            wait.recv().unwrap();
            vol.write_at(late, 12 << 20).unwrap();
            vol.sync().unwrap();
        });
        let hook = |p: &str| {
            if p == "finishing" {
                // The write starts now, and has time to land if anything lets it in.
                go.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            Ok(())
        };
        store
            .reencrypt(vol, &r, &k2, KeySpec::Aes256, &NoProgress, &hook)
            .unwrap();
        writer.join().unwrap();
    });
    let mut got = vec![0u8; late.len()];
    vol.read_at(&mut got, 12 << 20).unwrap();
    assert!(got == late, "the write read back wrong through the volume");
    drop(vol);
    assert!(e.info("disks/r")["reencrypt"].is_null());
    let stored = read_plain(&e.store, "disks/r");
    assert!(
        stored[..3 << 20] == data[..],
        "the data from before changed"
    );
    assert!(
        stored[12 << 20..(12 << 20) + late.len()] == late[..],
        "the racing write is not what the store holds"
    );
}

/// A re-encryption step that fails after recording its journal (a full disk, an I/O error:
/// injected here through the step hook) is undone: the open volume goes on reading every
/// sector right and taking writes, a write made then is not undone by the journal at the
/// next open, and the same request resumes and finishes. Before, the volume's memory said
/// "old key" for a chunk partly under the new one (reads returned garbage), and the journal,
/// still recorded, was replayed over later writes at the next open.
#[test]
fn a_failed_reencryption_step_is_undone_and_the_disk_goes_on() {
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let src = e.path("a.raw");
    let mut data = write_pattern(&src, 7 << 20, 41);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    data.resize(16 << 20, 0);
    let store = Store::at(&e.store, "local");
    for (n, point) in ["journal-recorded", "chunk-written"].iter().enumerate() {
        let name = format!("disks/u{n}");
        e.ok(&["import", src.to_str().unwrap(), &name, "--encrypt"]);
        let r = ResPath::parse(&name).unwrap();
        let mut want = data.clone();
        let vol = store.open_volume(&r, true).unwrap();
        // The second chunk (2-4 MiB) fails at `point`.
        let seen = std::cell::Cell::new(0);
        let hook = |p: &str| {
            if p == *point {
                seen.set(seen.get() + 1);
                if seen.get() == 2 {
                    return Err(encimg::Error::new(
                        encimg::ErrorKind::NoSpace,
                        "injected: no space left on device",
                    ));
                }
            }
            Ok(())
        };
        let err = store
            .reencrypt(&vol, &r, &k2, KeySpec::Aes256, &NoProgress, &hook)
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        let mut got = vec![0u8; 16 << 20];
        vol.read_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "{name}: read wrong after a step failed at {point}"
        );
        // A write into the chunk that failed, then the next open: it stays.
        let w = vec![0xc3u8; 64 << 10];
        vol.write_at(&w, (3 << 20) + 4096).unwrap();
        vol.sync().unwrap();
        want[(3 << 20) + 4096..(3 << 20) + 4096 + w.len()].copy_from_slice(&w);
        drop(vol);
        assert!(
            read_plain(&e.store, &name) == want,
            "{name}: a write after the failed step at {point} was lost at the next open"
        );
        assert!(!e.info(&name)["reencrypt"].is_null());
        // The same request resumes, and finishes.
        store
            .rekey(&r, &k2, RekeyMode::Reencrypt, &NoProgress)
            .unwrap();
        assert!(e.info(&name)["reencrypt"].is_null());
        assert!(
            read_plain(&e.store, &name) == want,
            "{name}: wrong after resume"
        );
    }
}

/// A header copy that reads as torn is healed from the other at a writable open only while
/// no header writer can run (the job lock): one being written right now reads as torn, and
/// healing it from the older copy undid that write (a rewrap silently reverted).
#[test]
fn a_torn_header_copy_is_healed_only_while_no_job_can_write_it() {
    let e = Env::new();
    let (file, data) = with_copy_a_torn(&e, "disks/a", 23);
    let torn = || {
        encimg::format::read_header(&std::fs::File::open(&file).unwrap())
            .unwrap()
            .1
    };
    assert!(torn());
    let store = Store::at(&e.store, "local");
    let r = ResPath::parse("disks/a").unwrap();
    // A job holds the resource (as a rekey writing its header would): read, not healed.
    let job = store.lock_job(&r).unwrap();
    let vol = store.open_volume(&r, true).unwrap();
    let mut got = vec![0u8; 1 << 20];
    vol.read_at(&mut got, 0).unwrap();
    assert!(got == data);
    drop(vol);
    assert!(torn(), "healed while a job could be writing the header");
    drop(job);
    // No job: the open heals it.
    drop(store.open_volume(&r, true).unwrap());
    assert!(!torn(), "not healed");
    assert!(read_plain(&e.store, "disks/a") == data);
}

/// A failed step whose undo fails too: the volume refuses every read (small, large), write
/// and fsync, including a write that was already waiting behind the step, until it is
/// opened again; the next open replays the journal and the disk reads as before the step.
/// Before, a waiting write landed under the old key and was acknowledged (fsync too), and
/// the replay then undid it; a large read bypassed the refusal and returned garbage.
#[test]
fn a_step_that_cannot_be_undone_refuses_io_until_reopened() {
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 6 << 20, 43);
    e.ok(&["import", src.to_str().unwrap(), "disks/p", "--encrypt"]);
    let r = ResPath::parse("disks/p").unwrap();
    let store = Store::at(&e.store, "local");
    let vol = store.open_volume(&r, true).unwrap();
    let fail = |what: &str| Err(encimg::Error::new(encimg::ErrorKind::Io, what.to_string()));
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let late = vec![0x77u8; 64 << 10];
    std::thread::scope(|t| {
        let (vol, late) = (&vol, &late);
        let writer = t.spawn(move || {
            wait.recv().unwrap();
            // Into the chunk being rewritten (2-4 MiB): waits behind the step's key lock.
            vol.write_at(late, (2 << 20) + 8192)
        });
        let seen = std::cell::Cell::new(0);
        let hook = |p: &str| match p {
            "chunk-written" => {
                seen.set(seen.get() + 1);
                if seen.get() == 2 {
                    go.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    return fail("injected: the rewrite failed");
                }
                Ok(())
            }
            "undoing" => fail("injected: the undo failed"),
            _ => Ok(()),
        };
        store
            .reencrypt(vol, &r, &k2, KeySpec::Aes256, &NoProgress, &hook)
            .unwrap_err();
        assert!(writer.join().unwrap().is_err(), "the waiting write landed");
    });
    let mut small = vec![0u8; 4096];
    assert!(vol.read_at(&mut small, 2 << 20).is_err());
    assert!(vol.read_owned(2 << 20, 1 << 20).is_err(), "a large read");
    assert!(vol.write_at(&late, 0).is_err());
    assert!(vol.sync().is_err());
    drop(vol);
    assert!(
        read_plain(&e.store, "disks/p") == data,
        "not as before the step"
    );
    store
        .rekey(&r, &k2, RekeyMode::Reencrypt, &NoProgress)
        .unwrap();
    assert!(
        read_plain(&e.store, "disks/p") == data,
        "wrong after resume"
    );
}
