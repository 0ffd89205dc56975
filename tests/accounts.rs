//! Accounts and sharing on a system store (SPEC §10), end to end: `encimg init --system`,
//! `encimg serve` (its socket and one mount per account), two ordinary users the test
//! creates, the ordinary CLI run as each of them (`encimg --system …`), and what one tries
//! against the other: through the CLI, the socket directly with crafted requests, the mount.
//!
//! Needs root (users, mounts), /dev/fuse, useradd and setpriv; CI has them.

mod common;
use common::mount::*;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Two users made for the test, removed when it ends.
struct Users(Vec<String>);

impl Users {
    fn new(tag: &str) -> Users {
        let mut v = Vec::new();
        for who in ["a", "b"] {
            let name = format!("ei{}{tag}{who}", std::process::id() % 100000);
            let _ = Command::new("userdel").arg(&name).output();
            sh(&format!("useradd -M -s /usr/sbin/nologin {name}"));
            v.push(name);
        }
        Users(v)
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("userdel").arg(u).output();
        }
    }
}

/// A system store served by `encimg serve`, all under one directory users can traverse.
struct System {
    dir: tempfile::TempDir,
    bin: PathBuf,
    serve: Option<Child>,
}

impl System {
    fn start() -> System {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The binary where every user can run it (the build tree may be root's alone).
        let bin = dir.path().join("encimg");
        std::fs::copy(env!("CARGO_BIN_EXE_encimg"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A child forked elsewhere in this process (tests run in parallel) may still hold
        // the copy's descriptor until it execs: wait out "Text file busy".
        let t = Instant::now();
        while let Err(e) = Command::new(&bin).arg("--version").output() {
            assert!(
                e.raw_os_error() == Some(libc::ETXTBSY) && t.elapsed() < Duration::from_secs(10),
                "{e}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut s = System {
            dir,
            bin,
            serve: None,
        };
        let o = Command::new(&s.bin)
            .args(["--system", "--store"])
            .arg(s.store())
            .arg("init")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let child = Command::new(&s.bin)
            .arg("--store")
            .arg(s.store())
            .arg("serve")
            .arg("--mountpoint")
            .arg(s.mnt())
            .arg("--socket")
            .arg(s.socket())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.dir.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        s.serve = Some(child);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(s.socket()).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("sys")
    }
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("encimg.sock")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }
    fn audit(&self) -> String {
        std::fs::read_to_string(self.store().join("audit.log")).unwrap_or_default()
    }

    /// A directory `user` owns, for its files.
    fn home(&self, user: &str) -> PathBuf {
        let h = self.dir.path().join(format!("home-{user}"));
        if !h.exists() {
            std::fs::create_dir(&h).unwrap();
            sh(&format!("chown {user}: {}", h.display()));
        }
        h
    }

    /// A shell command as `user`, in its home, with `E` the encimg client of this system.
    fn user_cmd(&self, user: &str, script: &str) -> Command {
        let home = self.home(user);
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .current_dir(&home)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &home)
        .env("E", format!("{} --system", self.bin.display()))
        .env("ENCIMG_SOCKET", self.socket())
        .env("MNT", self.mnt());
        c
    }

    /// Run a shell command as `user` (see [`System::user_cmd`]).
    fn as_user(&self, user: &str, script: &str) -> Output {
        self.user_cmd(user, script).output().unwrap()
    }

    /// Start a shell command as `user` without waiting for it.
    fn as_user_spawn(&self, user: &str, script: &str) -> Child {
        self.user_cmd(user, script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `encimg --system ARGS` as `user`: must succeed; its stdout.
    fn ok(&self, user: &str, args: &str) -> String {
        let o = self.as_user(user, &format!("$E {args}"));
        assert!(
            o.status.success(),
            "{user}: encimg {args}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// `encimg --system ARGS` as `user`: must fail with `code`; its stderr.
    fn fail(&self, user: &str, args: &str, code: i32) -> String {
        let o = self.as_user(user, &format!("$E {args}"));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(code), "{user}: encimg {args}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(rd) = std::fs::read_dir(self.mnt()) {
            for e in rd.flatten() {
                if is_mounted(&e.path()) {
                    let _ = Command::new("fusermount3")
                        .args(["-u", "-z"])
                        .arg(e.path())
                        .status();
                }
            }
        }
    }
}

fn can_run() -> bool {
    if !can_mount() {
        return false;
    }
    let ok = have("useradd") && have("setpriv");
    if !ok {
        eprintln!("SKIPPED: needs useradd and setpriv");
    }
    ok
}

fn errno_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn accounts_keep_to_their_own_and_share_cmk_images_whose_owner_keeps_control() {
    if !can_run() {
        return;
    }
    let users = Users::new("s");
    let (a, b) = (users.0[0].as_str(), users.0[1].as_str());
    let s = System::start();
    let data = pattern(8 << 20, 11);
    let img = s.home(a).join("base.raw");
    std::fs::write(&img, &data).unwrap();
    sh(&format!("chown {a}: {}", img.display()));

    // Each account: its own keys, its own service key, its own resources.
    s.ok(a, "key create --alias prod");
    s.ok(a, "import base.raw images/base --key alias/prod");
    s.ok(a, "import base.raw images/svc --encrypt");
    s.ok(a, "import base.raw images/plain");
    s.ok(b, "key create --alias bk");
    let a_keys: serde_json::Value = serde_json::from_str(&s.ok(a, "key list --json")).unwrap();
    let b_keys: serde_json::Value = serde_json::from_str(&s.ok(b, "key list --json")).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(a_keys.as_array().unwrap().len(), 2, "{a_keys}");
    assert!(
        ids(&b_keys).iter().all(|k| !ids(&a_keys).contains(k)),
        "separate keys"
    );
    let b_list: serde_json::Value = serde_json::from_str(&s.ok(b, "list --json")).unwrap();
    assert_eq!(b_list.as_array().unwrap().len(), 0, "{b_list}");
    // The store's files are root's: a user never reads them directly.
    let o = s.as_user(b, &format!("ls {}", s.store().display()));
    assert!(!o.status.success());

    // Share: a service-key image is refused with the advice; a CMK image is shared.
    let err = s.fail(a, &format!("share images/svc --with {b}"), 5);
    assert!(err.contains("copy it under a CMK first"), "{err}");
    s.ok(a, &format!("share images/base --with {b}"));
    s.ok(a, &format!("share images/plain --with {b}"));
    assert_eq!(s.ok(a, "share images/base").trim(), b);
    let j: serde_json::Value = serde_json::from_str(&s.ok(a, "share images/base --json")).unwrap();
    assert_eq!(j["shared_with"], serde_json::json!([b]));

    // The recipient sees it, reads it, makes a disk and copies from it.
    let list = s.ok(b, "list");
    assert!(list.contains(&format!("shared/{a}/base")), "{list}");
    let info: serde_json::Value =
        serde_json::from_str(&s.ok(b, &format!("info shared/{a}/base --json"))).unwrap();
    assert_eq!(info["shared_by"], a);
    s.ok(b, &format!("create disks/mine --from shared/{a}/base"));
    s.ok(
        b,
        &format!("copy shared/{a}/base images/own --key alias/bk"),
    );
    s.ok(b, &format!("copy shared/{a}/plain images/plain-copy"));
    let mine = s.mnt().join(b).join("disks/mine");
    let own = s.mnt().join(b).join("images/own");
    let read = |user: &str, p: &Path| s.as_user(user, &format!("cat {} > /dev/null", p.display()));
    assert_eq!(std::fs::read(&mine).unwrap(), data, "root reads b's mount");
    assert!(
        read(b, &mine).status.success(),
        "{}",
        errno_of(&read(b, &mine))
    );
    // In the recipient's mount: shared/OWNER/NAME, read-only.
    let shared_base = s.mnt().join(b).join(format!("shared/{a}/base"));
    let o = s.as_user(
        b,
        &format!(
            "ls $MNT/{b}/shared/{a} && cmp {} base.raw",
            shared_base.display()
        ),
    );
    let img_b = s.home(b).join("base.raw");
    std::fs::write(&img_b, &data).unwrap();
    let o2 = s.as_user(
        b,
        &format!(
            "ls $MNT/{b}/shared/{a} && cmp {} base.raw",
            shared_base.display()
        ),
    );
    assert!(o2.status.success(), "{o:?} {o2:?}");
    assert!(String::from_utf8_lossy(&o2.stdout).contains("base"));
    let o = s.as_user(
        b,
        &format!(
            "dd if=/dev/zero of={} bs=4k count=1 conv=notrunc",
            shared_base.display()
        ),
    );
    assert!(!o.status.success(), "a shared image was written: {o:?}");
    let mine_info: serde_json::Value =
        serde_json::from_str(&s.ok(b, "info disks/mine --json")).unwrap();
    let prod = s.ok(a, "key describe alias/prod --json");
    let prod: serde_json::Value = serde_json::from_str(&prod).unwrap();
    assert_eq!(
        mine_info["key_id"], prod["id"],
        "the disk stays under the owner's CMK"
    );

    // The owner disables the CMK: the recipient's next open fails; its own copy does not.
    s.ok(a, "key disable alias/prod");
    let o = read(b, &mine);
    assert!(errno_of(&o).contains("Permission denied"), "{o:?}");
    s.fail(b, "dek disks/mine --reveal", 6);
    assert!(read(b, &own).status.success());
    assert!(read(a, &s.mnt().join(a).join("images/svc"))
        .status
        .success());
    s.ok(a, "key enable alias/prod");
    assert!(read(b, &mine).status.success());

    // A deletion scheduled by the owner cuts it too (forced: the key is in use).
    s.ok(a, "key schedule-deletion alias/prod --days 7 --force");
    assert!(!read(b, &mine).status.success());
    s.ok(a, "key cancel-deletion alias/prod");
    s.ok(a, "key enable alias/prod");
    assert!(read(b, &mine).status.success());

    // Unsharing cuts it: exit 6 / EACCES, and it leaves b's list.
    s.ok(a, &format!("unshare images/base --with {b}"));
    let o = read(b, &mine);
    assert!(errno_of(&o).contains("Permission denied"), "{o:?}");
    s.fail(b, "dek disks/mine --reveal", 6);
    assert!(!s.ok(b, "list").contains(&format!("shared/{a}/base")));
    assert!(!s
        .as_user(b, &format!("cat {} > /dev/null", shared_base.display()))
        .status
        .success());
    assert!(read(b, &own).status.success(), "b's own copy is b's");
    let audit = s.audit();
    assert!(
        audit.contains(&format!("{a}: shared images/base with {b}")),
        "{audit}"
    );
    assert!(
        audit.contains(&format!("{a}: unshared images/base from {b}")),
        "{audit}"
    );
    assert!(audit.contains(&format!("{b}: refused")), "{audit}");

    // Files cross as descriptors: an export lands in the caller's file, as the caller.
    s.ok(a, "export images/plain out.raw");
    let out = s.home(a).join("out.raw");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let meta = std::fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), User::uid(a), "owned by the caller, not root");
    // A file the caller cannot read is refused by the caller's own open.
    s.fail(a, "import /etc/shadow images/stolen", 5);
}

struct User;
impl User {
    fn uid(name: &str) -> u32 {
        sh(&format!("id -u {name}")).trim().parse().unwrap()
    }
}

#[test]
fn another_account_is_refused_through_the_cli_the_socket_and_the_mount_and_it_is_logged() {
    if !can_run() {
        return;
    }
    let users = Users::new("x");
    let (a, b) = (users.0[0].as_str(), users.0[1].as_str());
    let s = System::start();
    let img = s.home(a).join("base.raw");
    std::fs::write(&img, pattern(4 << 20, 3)).unwrap();
    sh(&format!("chown {a}: {}", img.display()));
    s.ok(a, "key create --alias prod");
    s.ok(a, "key create --alias secret");
    s.ok(a, "import base.raw images/base --key alias/prod");
    s.ok(a, "import base.raw images/private --key alias/secret");
    s.ok(a, &format!("share images/base --with {b}"));
    s.ok(b, "list");
    let secret: serde_json::Value =
        serde_json::from_str(&s.ok(a, "key describe alias/secret --json")).unwrap();
    let secret = secret["id"].as_str().unwrap().to_string();
    let before =
        std::fs::read(s.store().join(format!("accounts/{a}/images/private.eimg"))).unwrap();

    // The CLI: what is not shared, and everything but reading what is.
    s.fail(b, &format!("info shared/{a}/private"), 5);
    s.fail(b, &format!("copy shared/{a}/private images/x"), 5);
    s.fail(b, &format!("create disks/x --from shared/{a}/private"), 5);
    for cmd in [
        format!("delete shared/{a}/base"),
        format!("rekey shared/{a}/base --key alias/acs/ecs"),
        format!("dek shared/{a}/base --reveal"),
        format!("snapshot shared/{a}/base snapshots/x"),
        format!("export shared/{a}/base x.raw"),
    ] {
        s.fail(b, &cmd, 5);
    }
    s.fail(b, &format!("share shared/{a}/base --with {b}"), 2);
    // Another account's CMK, by id.
    s.fail(b, &format!("create disks/z --size 1M --key {secret}"), 5);
    // Path tricks.
    s.fail(b, &format!("info shared/{a}/../{b}/x"), 2);
    s.fail(
        b,
        &format!("info shared/../../sys/accounts/{a}/images/base"),
        2,
    );
    s.fail(b, "share images/base --with ../root", 3);

    // The socket, with requests the client would never send.
    let craft = |argv: &str, files: &str| {
        let py = format!(
            r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["ENCIMG_SOCKET"])
fds = [1, 2] + [os.open(p[5:], os.O_PATH) if p.startswith("PATH:") else os.open(p, os.O_RDONLY) for p in {files}]
socket.send_fds(s, [json.dumps({{"argv": {argv}}}).encode() + b"\n"], fds)
r = s.makefile().readline()
print(r)
sys.exit(json.loads(r)["exit"])
"#
        );
        s.as_user(
            b,
            &format!("/usr/bin/python3 -c '{}'", py.replace('\'', "'\\''")),
        )
    };
    let store_a = format!("{}/accounts/{a}", s.store().display());
    for (argv, files, code) in [
        (format!(r#"["--store", "{store_a}", "list"]"#), "[]", 5),
        (format!(r#"["--store={store_a}", "list"]"#), "[]", 5),
        (r#"["import", "/etc/shadow", "images/x"]"#.to_string(), "[]", 5),
        (r#"["import", "/dev/fd/3", "images/x"]"#.to_string(), "[]", 2),
        (r#"["import", "/dev/fd/3/../../../etc/shadow", "images/x"]"#.to_string(), r#"["/dev/null"]"#, 2),
        (r#"["--passphrase-file", "/etc/shadow", "list"]"#.to_string(), "[]", 5),
        (r#"["serve", "--socket", "/tmp/x"]"#.to_string(), "[]", 5),
        (r#"["mount", "/tmp"]"#.to_string(), "[]", 5),
        (r#"["region", "add", "r", "--location", "/etc/evil"]"#.to_string(), "[]", 5),
        (r#"["region", "add", "r", "--kms", "pkcs11:module-path=/tmp/evil.so;token=t?pin-source=/etc/shadow"]"#.to_string(), "[]", 5),
        (r#""not a list""#.to_string(), "[]", 2),
        // An O_PATH descriptor needs no permission to make: it must open nothing.
        (r#"["import", "/dev/fd/3", "images/shadow"]"#.to_string(), r#"["PATH:/etc/shadow"]"#, 5),
        (r#"["key", "import", "alias/x", "--material", "/dev/fd/3"]"#.to_string(), r#"["PATH:/etc/shadow"]"#, 5),
    ] {
        let o = craft(&argv, files);
        assert_eq!(o.status.code(), Some(code), "{argv}: {o:?}");
    }
    assert!(!s
        .store()
        .join(format!("accounts/{b}/images/x.raw"))
        .exists());
    assert!(!Path::new("/etc/evil").exists());
    assert!(!s
        .store()
        .join(format!("accounts/{b}/images/shadow.raw"))
        .exists());

    // A flood of refused requests, each quoting 60 KB of arguments, must not fill the disk
    // that holds every account's data with audit lines: they are cut and throttled per user.
    let audit_before = s.audit().len();
    let t = Instant::now();
    let o = s.as_user(
        b,
        r#"/usr/bin/python3 -c '
import json, os, socket
for _ in range(300):
    c = socket.socket(socket.AF_UNIX)
    c.connect(os.environ["ENCIMG_SOCKET"])
    socket.send_fds(c, [json.dumps({"argv": ["--store", "A" * 60000, "list"]}).encode() + b"\n"], [1, 2])
    c.makefile().readline()
    c.close()
'"#,
    );
    assert!(o.status.success(), "{o:?}");
    let grown = s.audit().len() - audit_before;
    let bound = 1200 * 20 * (t.elapsed().as_secs() as usize + 2);
    assert!(
        grown <= bound,
        "the audit log grew by {grown} bytes (bound {bound})"
    );
    assert!(s.audit().contains("bytes more)"), "long lines are not cut");

    // Idle connections by one user do not keep the daemon from another.
    let holder = s.as_user_spawn(
        b,
        r#"/usr/bin/python3 -c '
import os, socket, time
conns = []
for _ in range(40):
    c = socket.socket(socket.AF_UNIX)
    c.connect(os.environ["ENCIMG_SOCKET"])
    conns.append(c)
time.sleep(3)
'"#,
    );
    std::thread::sleep(Duration::from_millis(800));
    let t = Instant::now();
    s.ok(a, "list");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let held = holder.wait_with_output().unwrap();
    assert!(held.status.success(), "{held:?}");

    // The mount: a's directory is a's alone, and b's attempt is logged.
    let a_dir = s.mnt().join(a);
    for cmd in [
        format!("ls {}/images", a_dir.display()),
        format!("cat {}/images/private > /dev/null", a_dir.display()),
        format!(
            "echo 'images/private images/x' > {}/.control/copy",
            a_dir.display()
        ),
        format!("stat {}/images/base", a_dir.display()),
        format!("stat -f {}", a_dir.display()),
    ] {
        let o = s.as_user(b, &cmd);
        assert!(errno_of(&o).contains("Permission denied"), "{cmd}: {o:?}");
    }
    assert!(s.log().contains("refused"), "{}", s.log());
    assert!(s.audit().contains(&format!("{b}: refused")));
    assert!(s.audit().contains("mount: refused"), "{}", s.audit());

    // Nothing of a's changed.
    let after = std::fs::read(s.store().join(format!("accounts/{a}/images/private.eimg"))).unwrap();
    assert_eq!(before, after);
    assert_eq!(
        s.ok(a, "list").matches("images/").count(),
        2,
        "a still has exactly its two images"
    );
}
