//! External key services (SPEC §8) against the real things, started here: PyKMIP's server
//! (`contrib/kms/pykmip-server.sh`, TLS with client certificates it makes) and a SoftHSM2
//! token (`contrib/kms/softhsm-token.sh`). Their administrators act with the services' own
//! clients (PyKMIP's client through `contrib/kms/pykmip-admin.py`, `pkcs11-tool`).
//!
//! Needs python3-pykmip, softhsm2 and opensc (contrib/test.sh installs them); the mount
//! parts need root and /dev/fuse. Everything binds to 127.0.0.1 and every process started
//! is stopped (its whole process group) when the test ends, however it ends.

mod common;
use common::mount::*;
use common::*;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";

fn contrib(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(p)
}

fn have_pykmip() -> bool {
    let ok = have("pykmip-server")
        && Command::new(PY)
            .args(["-c", "import kmip.pie.client"])
            .current_dir("/")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: needs python3-pykmip (bash contrib/test.sh installs it)");
    }
    ok
}

/// A port of 127.0.0.1 free now and never handed to another test of this process.
fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !taken.contains(&p) {
            taken.push(p);
            return p;
        }
    }
}

/// A PyKMIP server on a free port of 127.0.0.1, in its own process group.
struct Kmip {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Kmip {
    fn start(dir: PathBuf) -> Kmip {
        let mut k = Kmip {
            dir,
            port: 0,
            child: None,
        };
        k.port = free_port();
        k.run();
        k
    }

    /// Start the server on `self.port`; ready once its own log says it is bound (a port
    /// that answers might be another test's server).
    fn run(&mut self) {
        let log = self.dir.join("server.log");
        let bound = |log: &Path, port: u16| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches(&format!("bound socket handler to 127.0.0.1:{port}"))
                .count()
        };
        let before = bound(&log, self.port);
        let mut child = Command::new("bash")
            .arg(contrib("kms/pykmip-server.sh"))
            .arg(&self.dir)
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while bound(&log, self.port) == before
            || TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the KMIP server exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the KMIP server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child = Some(child);
    }

    fn uri(&self) -> String {
        std::fs::read_to_string(self.dir.join("uri"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: a signal to our child's process group (the server and its sessions).
            unsafe { libc::kill(-(c.id() as i32), sig) };
        }
    }

    /// Kill the server and every session process it forked.
    fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the server's administrator does, with PyKMIP's own client.
    fn admin(&self, op: &str, name: &str) -> String {
        let o = self.admin_run(op, name);
        assert!(
            o.status.success(),
            "pykmip-admin {op} {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn admin_run(&self, op: &str, name: &str) -> std::process::Output {
        Command::new(PY)
            .arg(contrib("kms/pykmip-admin.py"))
            .arg(&self.dir)
            .args([&self.port.to_string(), op, name])
            .current_dir("/")
            .output()
            .unwrap()
    }

    /// Every key's material in the server's database.
    fn materials(&self) -> Vec<Vec<u8>> {
        self.admin("materials", "")
            .lines()
            .map(|l| hex::decode(l).unwrap())
            .collect()
    }

    /// How many requests of `op` the server has processed (its log rotates at 1 MB).
    fn served(&self, op: &str) -> usize {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("server.log"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .matches(&format!("Processing operation: {op}"))
                    .count()
            })
            .sum()
    }
}

impl Drop for Kmip {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The plaintext of a resource of `region`, decrypted by OpenSSL with the data key the
/// region's key service unwrapped (`dek --reveal`).
fn plain(e: &Env, region: &str, res: &str) -> Vec<u8> {
    let i = e.json(&["--region", region, "info", res, "--json"]);
    let dek = hex::decode(e.ok(&["--region", region, "dek", res, "--reveal"]).trim()).unwrap();
    openssl_decrypt_with(
        Path::new(i["file"].as_str().unwrap()),
        &dek,
        i["data_offset"].as_u64().unwrap(),
        i["sector_size"].as_u64().unwrap(),
        i["size"].as_u64().unwrap(),
        i["cipher"].as_str().unwrap(),
    )
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&p));
        } else if t.is_file() {
            out.push(p);
        }
    }
    out
}

/// No file encimg wrote holds any of `secrets`, raw or in hex.
fn assert_nowhere(dir: &Path, secrets: &[Vec<u8>]) {
    let needles: Vec<Vec<u8>> = secrets
        .iter()
        .flat_map(|s| {
            [
                s.clone(),
                hex::encode(s).into_bytes(),
                hex::encode_upper(s).into_bytes(),
            ]
        })
        .collect();
    let all = files(dir);
    assert!(all.len() > 10, "{} files only", all.len());
    for f in all {
        let data = std::fs::read(&f).unwrap();
        for n in &needles {
            assert!(
                !data.windows(n.len()).any(|w| w == &n[..]),
                "{} holds key material from the service",
                f.display()
            );
        }
    }
}

fn key_id(e: &Env, region: &str, alias: &str) -> String {
    e.json(&["--region", region, "key", "describe", alias, "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn kmip_every_key_command_and_resource_operation_with_the_material_only_in_the_server() {
    if !have_pykmip() {
        return;
    }
    let e = Env::new();
    let kmip = Kmip::start(e.path("kmip"));
    let name = format!("KMIP server 127.0.0.1:{}", kmip.port);
    // A server we cannot authenticate (our own client certificate as its CA) is refused in
    // the handshake, and nothing of the region is left.
    let wrong_ca = kmip.uri().replace("ca.pem", "client.pem");
    let err = e.fail(&["region", "add", "bad", "--kms", &wrong_ca], 6);
    assert!(err.contains(&name) && err.contains("TLS"), "{err}");
    assert!(!e.store.join("regions/bad").exists());
    // Credentials only from files named in the URI.
    let err = e.fail(
        &[
            "region",
            "add",
            "bad",
            "--kms",
            &format!("{}&password=x", kmip.uri()),
        ],
        2,
    );
    assert!(err.contains("unknown parameter 'password'"), "{err}");
    e.ok(&["region", "add", "k1", "--kms", &kmip.uri()]);
    let k1 = e.with(&["--region", "k1"]);
    let ok = |args: &[&str]| k1.ok(args);
    let fail = |args: &[&str], code: i32| k1.fail(args, code);
    let json = |args: &[&str]| k1.json(args);

    // Keys: every command, the same JSON shape as a local key's, the state the server's.
    ok(&[
        "key",
        "create",
        "--alias",
        "prod",
        "--description",
        "in KMIP",
    ]);
    e.ok(&["key", "create", "--alias", "local-prod"]);
    let k = json(&["key", "describe", "alias/prod", "--json"]);
    let l = e.json(&["key", "describe", "alias/local-prod", "--json"]);
    let shape = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(shape(&k), shape(&l), "same JSON shape as a local key");
    assert_eq!(k["state"], "Enabled");
    assert_eq!(k["key_service"], name.as_str());
    assert_eq!(k["service_state"], "Active");
    assert_eq!(l["key_service"], "local");
    let prod = k["id"].as_str().unwrap().to_string();
    assert_eq!(kmip.admin("state", &format!("encimg {prod} v1")), "ACTIVE");
    let list = json(&["key", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    ok(&["key", "tag", "alias/prod", "team=storage"]);
    ok(&["key", "rotate", "alias/prod"]);
    assert_eq!(kmip.admin("state", &format!("encimg {prod} v2")), "ACTIVE");
    ok(&["key", "disable", "alias/prod"]);
    let k = json(&["key", "describe", "alias/prod", "--json"]);
    assert_eq!(k["state"], "Disabled");
    assert_eq!(k["tags"]["team"], "storage");
    assert_eq!(k["current_version"], 2);
    ok(&["key", "enable", "alias/prod"]);
    ok(&["key", "schedule-deletion", "alias/prod", "--days", "7"]);
    assert_eq!(
        json(&["key", "describe", "alias/prod", "--json"])["state"],
        "PendingDeletion"
    );
    ok(&["key", "cancel-deletion", "alias/prod"]);
    ok(&["key", "enable", "alias/prod"]);
    // A deletion whose date has passed destroys the key at the server.
    ok(&["key", "create", "--alias", "doomed"]);
    let doomed = key_id(&e, "k1", "alias/doomed");
    ok(&["key", "schedule-deletion", "alias/doomed", "--days", "7"]);
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 8 * 86400;
    let o = e
        .cmd()
        .env("ENCIMG_TEST_NOW", later.to_string())
        .args(["--region", "k1", "key", "list", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains(&doomed));
    let gone = kmip.admin_run("state", &format!("encimg {doomed} v1"));
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no key named"),
        "{gone:?}"
    );
    // BYOK: the material goes into the server once (Register), and is used there.
    ok(&["key", "create", "--origin", "EXTERNAL", "--alias", "byok"]);
    let material = pattern(32, 99);
    std::fs::write(e.path("material"), &material).unwrap();
    ok(&[
        "key",
        "import",
        "alias/byok",
        "--material",
        e.path("material").to_str().unwrap(),
    ]);
    assert!(
        kmip.materials().contains(&material),
        "registered at the server"
    );
    // What the server cannot do is refused, naming it; nothing is emulated locally.
    let err = fail(&["key", "create", "--spec", "SM4", "--alias", "cn"], 5);
    assert!(err.contains(&name) && err.contains("SM4"), "{err}");
    assert!(json(&["key", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["alias"] != "alias/cn"));

    // Resources: import, create, copies with and without a new key, rekeys, snapshots.
    let base = e.path("base.raw");
    let data = write_pattern(&base, 4 << 20, 1);
    ok(&[
        "import",
        base.to_str().unwrap(),
        "images/base",
        "--key",
        "alias/prod",
    ]);
    ok(&["create", "disks/blank", "--size", "8M", "--encrypt"]);
    ok(&["create", "disks/d", "--from", "images/base"]);
    ok(&["snapshot", "disks/d", "snapshots/s"]);
    ok(&["copy", "images/base", "images/same"]);
    ok(&[
        "copy",
        "images/base",
        "images/svc",
        "--key",
        "alias/acs/ecs",
    ]);
    ok(&["copy", "images/base", "images/byok", "--key", "alias/byok"]);
    ok(&["rekey", "images/same", "--key", "alias/byok"]);
    ok(&["rekey", "images/svc", "--key", "alias/prod", "--reencrypt"]);
    for res in [
        "images/base",
        "disks/d",
        "snapshots/s",
        "images/same",
        "images/svc",
        "images/byok",
    ] {
        assert_eq!(plain(&e, "k1", res), data, "{res}");
    }
    let usage = ok(&["key", "usage", "alias/prod"]);
    for res in ["images/base", "disks/d", "snapshots/s", "images/svc"] {
        assert!(usage.contains(res), "{usage}");
    }
    // Cross-region copies between the local region and the KMIP region, both ways.
    let local = e.path("local.raw");
    let ldata = write_pattern(&local, 2 << 20, 2);
    e.ok(&[
        "import",
        local.to_str().unwrap(),
        "images/l",
        "--key",
        "alias/local-prod",
    ]);
    e.ok(&[
        "copy",
        "images/l",
        "images/l",
        "--to-region",
        "k1",
        "--key",
        "alias/prod",
    ]);
    assert_eq!(plain(&e, "k1", "images/l"), ldata);
    ok(&[
        "copy",
        "images/base",
        "images/from-k1",
        "--to-region",
        "local",
    ]);
    assert_eq!(plain(&e, "local", "images/from-k1"), data);

    // The CMKs' material is in the server's database and in no file encimg wrote.
    let secrets = kmip.materials();
    assert!(secrets.len() >= 4, "{} keys at the server", secrets.len());
    assert_nowhere(&e.store, &secrets);
}

#[test]
fn kmip_an_administrators_revoke_cuts_access_at_the_next_open_and_a_stopped_server_is_bounded() {
    if !have_pykmip() || !can_mount() {
        return;
    }
    let e = Env::new();
    let mut kmip = Kmip::start(e.path("kmip"));
    let name = format!("KMIP server 127.0.0.1:{}", kmip.port);
    e.ok(&["region", "add", "k1", "--kms", &kmip.uri()]);
    let k1 = e.with(&["--region", "k1", "--kms-timeout", "3"]);
    let run = |args: &[&str]| k1.run(args);
    let ok = |args: &[&str]| k1.ok(args);
    ok(&["key", "create", "--alias", "a"]);
    ok(&["key", "create", "--alias", "b"]);
    let base = e.path("base.raw");
    let data = write_pattern(&base, 8 << 20, 3);
    ok(&[
        "import",
        base.to_str().unwrap(),
        "images/a",
        "--key",
        "alias/a",
    ]);
    ok(&[
        "import",
        base.to_str().unwrap(),
        "images/b",
        "--key",
        "alias/b",
    ]);
    ok(&[
        "import",
        base.to_str().unwrap(),
        "images/b2",
        "--key",
        "alias/b",
    ]);
    let big = e.path("big.raw");
    write_pattern(&big, 96 << 20, 4);
    ok(&[
        "import",
        big.to_str().unwrap(),
        "images/big",
        "--key",
        "alias/b",
    ]);

    let m = Mounted::new(&e, &["--region", "k1", "--kms-timeout", "3"]);
    // Opening a resource costs one request to the server (the unwrap), no more.
    let before = (kmip.served("Decrypt"), kmip.served("GetAttributes"));
    assert_eq!(std::fs::read(m.p("images/a")).unwrap(), data);
    assert_eq!(
        (kmip.served("Decrypt"), kmip.served("GetAttributes")),
        (before.0 + 1, before.1),
        "one Decrypt per first open"
    );

    // The administrator revokes key a with PyKMIP's own client.
    let a = key_id(&e, "k1", "alias/a");
    kmip.admin("revoke", &format!("encimg {a} v1"));
    let err = std::fs::read(m.p("images/a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let o = run(&["copy", "images/a", "images/a2", "--key", "alias/b"]);
    let msg = check_failure(&["copy"], &o, 6);
    assert!(msg.contains(&name) && msg.contains("Deactivated"), "{msg}");
    let k = e.json(&["--region", "k1", "key", "describe", "alias/a", "--json"]);
    assert_eq!(
        (k["state"].as_str(), k["service_state"].as_str()),
        (Some("Disabled"), Some("Deactivated"))
    );
    let o = run(&["key", "enable", "alias/a"]);
    assert!(check_failure(&["key"], &o, 6).contains("no way back"));
    // Other keys and their resources are unaffected.
    assert_eq!(std::fs::read(m.p("images/b")).unwrap(), data);
    let log = std::fs::read_to_string(e.store.join("regions/k1/mount.log")).unwrap();
    assert!(
        log.contains("open images/a refused") && log.contains(&name),
        "{log}"
    );

    // The server goes away: a file already open keeps working, new opens get EACCES within
    // the timeout, the CLI fails with exit 6 naming the server, and nothing is lost.
    let held = std::fs::File::open(m.p("images/b")).unwrap();
    kmip.stop();
    let t = Instant::now();
    let err = std::fs::read(m.p("images/b2")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let mut buf = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    held.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert_eq!(buf, data[3 << 20..4 << 20]);
    let t = Instant::now();
    let o = run(&["key", "create", "--alias", "c"]);
    assert!(check_failure(&["key"], &o, 6).contains(&name));
    assert!(t.elapsed() < Duration::from_secs(8));
    let o = run(&["copy", "images/b", "images/b3", "--key", "alias/a"]);
    check_failure(&["copy"], &o, 6);
    assert!(!e.store.join("regions/k1/images/b3.eimg").exists());

    // A server that answers a byte at a time: the timeout bounds the whole call, not each
    // read (a relay in front of the real server, 4 bytes a second towards the client).
    kmip.run();
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let upstream = kmip.port;
    std::thread::spawn(move || {
        for c in relay.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut up2);
                });
                use std::io::{Read, Write};
                let (mut up, mut c) = (up, c);
                let mut b = [0u8; 1];
                while matches!(up.read(&mut b), Ok(1)) {
                    if c.write_all(&b).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
    });
    let slow_uri = kmip.uri().replace(
        &format!("127.0.0.1:{}", kmip.port),
        &format!("127.0.0.1:{relay_port}"),
    );
    let t = Instant::now();
    let o = e.run(&[
        "--kms-timeout",
        "2",
        "region",
        "add",
        "slow",
        "--kms",
        &slow_uri,
    ]);
    let msg = check_failure(&["region"], &o, 6);
    assert!(msg.contains("in time"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    kmip.stop();

    // A server that hangs (stopped, its socket still open) is bounded the same way.
    kmip.run();
    kmip.signal(libc::SIGSTOP);
    let t = Instant::now();
    let o = run(&["copy", "images/b", "images/b4", "--key", "alias/b"]);
    let msg = check_failure(&["copy"], &o, 6);
    assert!(msg.contains(&name) && msg.contains("unreachable"), "{msg}");
    assert_eq!(msg.matches("unreachable").count(), 1, "said twice: {msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // A listing asks the hung server once, not once per key (two keys here, 3 s each).
    let t = Instant::now();
    let o = run(&["key", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let states: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["service_state"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(states.len() >= 2, "{states:?}");
    assert!(
        states
            .iter()
            .all(|s| s.starts_with("unknown: ") && s.contains("unreachable")),
        "{states:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    kmip.signal(libc::SIGCONT);

    // A copy with a new key while the server dies under it: whole, or absent.
    let copy = {
        let mut c = e.cmd();
        c.args(&k1.pre)
            .args(["copy", "images/big", "images/big2", "--key", "alias/b"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    std::thread::sleep(Duration::from_millis(30));
    kmip.stop();
    let out = copy.wait_with_output().unwrap();
    let tmp: Vec<_> = std::fs::read_dir(e.store.join("regions/k1/tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "left in tmp: {tmp:?}");

    // Back: everything works again, in the same mount and the CLI.
    kmip.run();
    assert_eq!(std::fs::read(m.p("images/b2")).unwrap(), data);
    ok(&["key", "create", "--alias", "c"]);
    let big2 = e.store.join("regions/k1/images/big2.eimg");
    if out.status.success() {
        assert!(big2.exists());
        assert_eq!(
            std::fs::read(m.p("images/big2")).unwrap(),
            std::fs::read(&big).unwrap()
        );
    } else {
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        assert!(!big2.exists(), "a failed copy left its destination");
    }
    drop(held);
    m.umount();
}

/// A SoftHSM2 token in the test's directory; its configuration for every encimg run.
fn softhsm(e: &mut Env) -> Option<String> {
    if !have("softhsm2-util") || !have("pkcs11-tool") {
        eprintln!("SKIPPED: needs softhsm2 and opensc (bash contrib/test.sh installs them)");
        return None;
    }
    let dir = e.path("hsm");
    let o = Command::new("bash")
        .arg(contrib("kms/softhsm-token.sh"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    e.vars.push((
        "SOFTHSM2_CONF".into(),
        dir.join("softhsm2.conf").to_str().unwrap().into(),
    ));
    Some(String::from_utf8(o.stdout).unwrap().trim().to_string())
}

/// `pkcs11-tool` on the test's token, as its administrator runs it.
fn pkcs11_tool(e: &Env, args: &[&str]) -> (bool, String) {
    let dir = e.path("hsm");
    let pin = std::fs::read_to_string(dir.join("pin")).unwrap();
    let o = Command::new("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            "encimg",
        ])
        .args(["--login", "--pin", pin.trim()])
        .args(args)
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

#[test]
fn pkcs11_keys_live_on_the_token_and_its_attributes_are_their_state() {
    let mut e = Env::new();
    let Some(uri) = softhsm(&mut e) else { return };
    let token = "PKCS#11 token 'encimg'";
    // A PIN on the command line is refused; a wrong PIN file fails the login without
    // the PIN appearing anywhere.
    let with_value = uri.replace("?pin-source=", "?pin-value=1234&pin-source=");
    let err = e.fail(&["region", "add", "hsm", "--kms", &with_value], 2);
    assert!(err.contains("pin-value") && !err.contains("1234"), "{err}");
    std::fs::write(e.path("wrong-pin"), "not-the-pin-987\n").unwrap();
    let wrong = format!(
        "{}?pin-source={}",
        uri.split('?').next().unwrap(),
        e.path("wrong-pin").display()
    );
    let err = e.fail(&["region", "add", "hsm", "--kms", &wrong], 6);
    assert!(
        err.contains(token) && err.contains("login") && !err.contains("987"),
        "{err}"
    );
    assert!(!e.store.join("regions/hsm").exists());
    e.ok(&["region", "add", "hsm", "--kms", &uri]);
    let hsm = e.with(&["--region", "hsm"]);
    let ok = |args: &[&str]| hsm.ok(args);
    let fail = |args: &[&str], code: i32| hsm.fail(args, code);
    ok(&["key", "create", "--alias", "prod"]);
    let k = e.json(&["--region", "hsm", "key", "describe", "alias/prod", "--json"]);
    assert!(k["key_service"].as_str().unwrap().starts_with(token), "{k}");
    assert_eq!(k["service_state"], "Active");
    let prod = k["id"].as_str().unwrap().to_string();
    // On the token: sensitive, never extractable; its value cannot be read out.
    let (_, objects) = pkcs11_tool(&e, &["--list-objects", "--type", "secrkey"]);
    let entry = objects
        .split("Secret Key Object")
        .find(|o| o.contains(&format!("encimg {prod} v1")))
        .unwrap_or_else(|| panic!("{objects}"));
    assert!(
        entry.contains("sensitive") && entry.contains("never extractable"),
        "{entry}"
    );
    let id = entry
        .lines()
        .find_map(|l| l.trim().strip_prefix("ID:"))
        .unwrap()
        .trim()
        .to_string();
    let (read, out) = pkcs11_tool(&e, &["--read-object", "--type", "secrkey", "--id", &id]);
    assert!(!read, "the key's value was read from the token: {out}");

    let err = fail(&["key", "create", "--spec", "SM4", "--alias", "cn"], 5);
    assert!(err.contains(token) && err.contains("SM4"), "{err}");

    let base = e.path("base.raw");
    let data = write_pattern(&base, 4 << 20, 5);
    ok(&[
        "import",
        base.to_str().unwrap(),
        "images/base",
        "--key",
        "alias/prod",
    ]);
    ok(&[
        "copy",
        "images/base",
        "images/svc",
        "--key",
        "alias/acs/ecs",
    ]);
    ok(&["rekey", "images/svc", "--key", "alias/prod", "--reencrypt"]);
    ok(&["key", "rotate", "alias/prod"]);
    ok(&["rekey", "images/base", "--key", "alias/acs/ecs"]);
    ok(&["key", "tag", "alias/prod", "owner=qa"]);
    for res in ["images/base", "images/svc"] {
        assert_eq!(plain(&e, "hsm", res), data, "{res}");
    }
    e.ok(&[
        "copy",
        "images/base",
        "images/local",
        "--region",
        "hsm",
        "--to-region",
        "local",
    ]);
    assert_eq!(plain(&e, "local", "images/local"), data);

    // encimg's disable turns the token's usage attributes off, and enable back on.
    ok(&["key", "disable", "alias/prod"]);
    let (_, objects) = pkcs11_tool(&e, &["--list-objects", "--type", "secrkey"]);
    let entry = objects
        .split("Secret Key Object")
        .find(|o| o.contains(&format!("encimg {prod} v1")))
        .unwrap();
    assert!(!entry.contains("decrypt"), "{entry}");
    let o = e.run(&["--region", "hsm", "dek", "images/svc", "--reveal"]);
    check_failure(&["dek"], &o, 6);
    ok(&["key", "enable", "alias/prod"]);
    assert_eq!(plain(&e, "hsm", "images/svc"), data);

    // The token's administrator deletes the key with pkcs11-tool: refused at the next use.
    for v in ["v1", "v2"] {
        let id = objects
            .split("Secret Key Object")
            .find(|o| o.contains(&format!("encimg {prod} {v}")))
            .and_then(|o| o.lines().find_map(|l| l.trim().strip_prefix("ID:")))
            .unwrap()
            .trim()
            .to_string();
        let (okd, out) = pkcs11_tool(&e, &["--delete-object", "--type", "secrkey", "--id", &id]);
        assert!(okd, "{out}");
    }
    let o = e.run(&["--region", "hsm", "dek", "images/svc", "--reveal"]);
    let msg = check_failure(&["dek"], &o, 6);
    assert!(msg.contains(token), "{msg}");
    let k = e.json(&["--region", "hsm", "key", "describe", "alias/prod", "--json"]);
    assert_eq!(k["service_state"], "Destroyed");
    // The service key's resources are unaffected, through the CLI and through a mount
    // (whose daemon opens the token itself).
    assert_eq!(plain(&e, "hsm", "images/base"), data);
    if can_mount() {
        let m = Mounted::new(&e, &["--region", "hsm"]);
        assert_eq!(std::fs::read(m.p("images/base")).unwrap(), data);
        let err = std::fs::read(m.p("images/svc")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        m.umount();
    }

    // The PIN came from its file: it is in no file encimg wrote, and not in the mount log.
    let pin = std::fs::read_to_string(e.path("hsm/pin")).unwrap();
    assert_nowhere(&e.store, &[pin.trim().as_bytes().to_vec()]);
}
