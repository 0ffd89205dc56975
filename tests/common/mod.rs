//! Shared helpers for the CLI tests: a temporary store and the `encimg` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod mount;
pub mod sweep;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    /// Extra environment for every encimg run (e.g. SOFTHSM2_CONF).
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A fresh, initialized store in a temporary directory.
    pub fn new() -> Env {
        let e = Env::bare();
        e.ok(&["init"]);
        e
    }

    /// A temporary directory with no store yet.
    pub fn bare() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        Env {
            dir,
            store,
            vars: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_encimg"));
        c.env("ENCIMG_STORE", &self.store)
            .env_remove("ENCIMG_PASSPHRASE")
            .env_remove("ENCIMG_TEST_NOW");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run encimg")
    }

    /// Run with a deadline: a command that hangs (a FIFO where a file should be) is killed
    /// and the test fails saying so.
    pub fn run_within(&self, args: &[&str], secs: u64) -> Output {
        use std::io::Read;
        let mut child = self
            .cmd()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run encimg");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut out = Vec::new();
                let mut err = Vec::new();
                child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
                child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
                return Output {
                    status,
                    stdout: out,
                    stderr: err,
                };
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("encimg {args:?} hung for {secs} s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Like [`Env::fail`], with a deadline (see [`Env::run_within`]).
    pub fn fail_within(&self, args: &[&str], code: i32, secs: u64) -> String {
        let o = self.run_within(args, secs);
        check_failure(args, &o, code)
    }

    /// Run, expect success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "encimg {args:?} failed ({:?}): {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf8")
    }

    /// Run, expect failure with `code`, return stderr (checked to be one line).
    pub fn fail(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        check_failure(args, &o, code)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("json output")
    }

    /// A new AES_256 KMS key with an alias; returns its id.
    pub fn key(&self, alias: &str, spec: &str) -> String {
        self.ok(&["key", "create", "--spec", spec, "--alias", alias])
            .trim()
            .to_string()
    }

    pub fn info(&self, res: &str) -> serde_json::Value {
        self.json(&["info", res, "--json"])
    }

    pub fn dek(&self, res: &str) -> Vec<u8> {
        hex::decode(self.ok(&["dek", res, "--reveal"]).trim()).expect("hex dek")
    }
}

/// Check a failed run: exit `code`, one line on stderr starting `encimg: error: `, no panic.
pub fn check_failure(args: &[&str], o: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(code),
        "encimg {args:?}: expected exit {code}, stdout {} stderr {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error is not one line: {err}"
    );
    assert!(err.starts_with("encimg: error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Deterministic pseudo-random bytes.
/// A store lock the test takes itself, waiting out a moment when it is busy: a child another
/// test forks in parallel holds every descriptor of this process until it execs.
pub fn take_lock<T>(f: impl Fn() -> encimg::Result<T>) -> T {
    let t = std::time::Instant::now();
    loop {
        match f() {
            Err(e) if e.kind == encimg::ErrorKind::Busy && t.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Write a file with pattern bytes and return its contents.
pub fn write_pattern(p: &Path, len: usize, seed: u64) -> Vec<u8> {
    let d = pattern(len, seed);
    std::fs::write(p, &d).expect("write");
    d
}

/// Decrypt an encrypted resource's payload independently of encimg, with the script the
/// README documents (`contrib/xts-decrypt.py`: OpenSSL through Python's `cryptography`,
/// sector by sector, tweak = sector number LE; SM4-XTS built on OpenSSL's SM4).
pub fn openssl_decrypt_with(
    file: &Path,
    dek: &[u8],
    data_offset: u64,
    sector: u64,
    size: u64,
    cipher: &str,
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.hex");
    std::fs::write(&key, hex::encode(dek)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/xts-decrypt.py");
    let o = Command::new("python3")
        .arg(script)
        .arg(file)
        .arg(&key)
        .args([
            data_offset.to_string(),
            sector.to_string(),
            size.to_string(),
            cipher.to_string(),
        ])
        .output()
        .expect("python3 with cryptography (installed by .ci/run)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// [`openssl_decrypt_with`] for AES-XTS.
pub fn openssl_decrypt(
    file: &Path,
    dek: &[u8],
    data_offset: u64,
    sector: u64,
    size: u64,
) -> Vec<u8> {
    openssl_decrypt_with(file, dek, data_offset, sector, size, "aes-xts-plain64")
}

/// Plaintext of a resource read through the library (not the CLI).
pub fn read_plain(store: &Path, res: &str) -> Vec<u8> {
    let s = encimg::store::Store::at(store, "local");
    let r = encimg::store::ResPath::parse(res).unwrap();
    let v = s.open_volume(&r, false).expect("open volume");
    let mut buf = vec![0u8; v.size() as usize];
    let n = v.read_at(&mut buf, 0).unwrap();
    assert_eq!(n as u64, v.size());
    buf
}

/// An [`Env`] whose every run starts with the same global options (`--region R`, …).
pub struct With<'a> {
    pub e: &'a Env,
    pub pre: Vec<String>,
}

impl Env {
    pub fn with(&self, pre: &[&str]) -> With<'_> {
        With {
            e: self,
            pre: pre.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl With<'_> {
    fn args<'b>(&'b self, args: &[&'b str]) -> Vec<&'b str> {
        self.pre
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect()
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.e.run(&self.args(args))
    }
    pub fn ok(&self, args: &[&str]) -> String {
        self.e.ok(&self.args(args))
    }
    pub fn fail(&self, args: &[&str], code: i32) -> String {
        self.e.fail(&self.args(args), code)
    }
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.e.json(&self.args(args))
    }
}
