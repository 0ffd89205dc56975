//! `kill -9` of the CLI in the middle of a copy, a rewrap and a re-encryption, at random
//! points (the seed is printed; set ENCIMG_CRASH_SEED to replay, ENCIMG_CRASH_POINTS for
//! more points): the source is untouched, the target is complete or absent (never visible
//! while partial), a rewrapped header always opens, and an interrupted re-encryption is
//! readable at once and finishes when the request is repeated.

mod common;
use common::*;

use std::time::{Duration, Instant};

fn points() -> usize {
    std::env::var("ENCIMG_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn seed() -> u64 {
    let s = std::env::var("ENCIMG_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash seed: {s} (replay with ENCIMG_CRASH_SEED={s})");
    s
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Run `args`, kill -9 it after `delay` (if still running); true if it was killed.
fn run_and_kill(e: &Env, args: &[&str], delay: Duration) -> bool {
    let mut child = e
        .cmd()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "encimg {args:?} failed without being killed"
            );
            return false;
        }
        if start.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn timed(e: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    e.ok(args);
    t.elapsed()
}

fn no_partial_visible(e: &Env) {
    for kind in ["images", "disks", "snapshots"] {
        for ent in std::fs::read_dir(e.store.join(kind)).unwrap().flatten() {
            let n = ent.file_name().into_string().unwrap();
            assert!(
                n.ends_with(".eimg") || n.ends_with(".raw"),
                "stray file {kind}/{n}"
            );
        }
    }
}

#[test]
fn kill_9_during_copy_rewrap_and_reencryption() {
    let mut rng = Rng(seed() | 1);
    let e = Env::new();
    let k2 = e.key("k2", "AES_256");
    let sm4 = e.key("sm4", "SM4");
    let src = e.path("a.raw");
    let data = write_pattern(&src, 24 << 20, 31);
    e.ok(&[
        "import",
        src.to_str().unwrap(),
        "images/src",
        "--encrypt",
        "--sector-size",
        "512",
    ]);
    let src_dek = e.dek("images/src");
    let (mut killed, mut n) = (0, 0);

    // Copy with a new key (full re-encryption) and the verbatim copy.
    let t_copy = timed(&e, &["copy", "images/src", "images/probe", "--key", &k2]);
    e.ok(&["delete", "images/probe"]);
    for i in 0..points() {
        let dst = format!("images/c{i}");
        let args: Vec<&str> = if i % 2 == 0 {
            vec!["copy", "images/src", &dst, "--key", &k2]
        } else {
            vec!["copy", "images/src", &dst]
        };
        let delay = Duration::from_micros(rng.below(t_copy.as_micros() as u64 * 12 / 10));
        killed += run_and_kill(&e, &args, delay) as usize;
        n += 1;
        no_partial_visible(&e);
        if e.run(&["info", &dst]).status.success() {
            assert!(
                read_plain(&e.store, &dst) == data,
                "{dst} visible but not complete"
            );
            e.ok(&["delete", &dst]);
        }
        // Leftovers of the killed job are swept, and a retry works.
        e.ok(&args);
        assert!(read_plain(&e.store, &dst) == data);
        e.ok(&["delete", &dst]);
    }
    assert_eq!(e.dek("images/src"), src_dek);
    assert!(
        read_plain(&e.store, "images/src") == data,
        "copy source changed"
    );
    let left: Vec<_> = std::fs::read_dir(e.store.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "partial files left behind: {left:?}");

    // Rewrap: the header always opens, under the old or the new key.
    for i in 0..points() {
        let key = if i % 2 == 0 {
            k2.clone()
        } else {
            "alias/acs/ecs".to_string()
        };
        let delay = Duration::from_micros(rng.below(20_000));
        killed += run_and_kill(&e, &["rekey", "images/src", "--key", &key], delay) as usize;
        n += 1;
        assert_eq!(e.dek("images/src"), src_dek, "rewrap lost the data key");
    }
    assert!(read_plain(&e.store, "images/src") == data);

    // In-place re-encryption: readable at once, resumable by repeating the request.
    e.ok(&["copy", "images/src", "disks/r"]);
    let t_re = timed(&e, &["rekey", "disks/r", "--key", &sm4, "--reencrypt"]);
    e.ok(&["delete", "disks/r"]);
    for i in 0..points() {
        let name = format!("disks/r{i}");
        e.ok(&["copy", "images/src", &name]);
        let delay = Duration::from_micros(rng.below(t_re.as_micros() as u64 * 11 / 10));
        let was_killed = run_and_kill(&e, &["rekey", &name, "--key", &sm4, "--reencrypt"], delay);
        killed += was_killed as usize;
        n += 1;
        assert!(
            read_plain(&e.store, &name) == data,
            "{name}: unreadable after kill -9 (delay {delay:?})"
        );
        e.ok(&["rekey", &name, "--key", &sm4, "--reencrypt"]);
        let info = e.info(&name);
        assert_eq!(info["cipher"], "sm4-xts-plain64");
        assert!(info["reencrypt"].is_null());
        assert!(
            read_plain(&e.store, &name) == data,
            "{name}: wrong after resume"
        );
        e.ok(&["delete", &name]);
    }
    eprintln!("crash points: {n}, of which {killed} killed the process mid-operation");
    assert!(
        killed >= points() / 2,
        "too few runs were actually interrupted ({killed}/{n})"
    );
}
