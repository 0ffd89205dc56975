//! The key-store root key: a 32-byte key that seals every CMK's material. By default it is
//! a 0600 file `keys/root.key` (refused if group or others can read it, as ssh refuses a
//! private key); when a passphrase is given at `init` (`ENCIMG_PASSPHRASE_FILE`,
//! `--passphrase-file`, or `ENCIMG_PASSPHRASE`, see `sys::secret`), it is derived from that
//! passphrase with Argon2id instead and never stored. A derived key is kept (in a
//! [`SecretBox`]) for the life of the process, so a mount does not run Argon2 per open.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, AeadKind, NONCE_LEN};
use crate::err;
use crate::error::{IoContext, Result};
use crate::sys::secret::{self, SecretBox};
use crate::sys::{self};

pub use crate::sys::secret::PASSPHRASE_ENV;

/// How the root key is obtained.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RootInfo {
    /// A 32-byte 0600 file `keys/root.key`.
    #[default]
    File,
    /// Argon2id over `ENCIMG_PASSPHRASE`; `check` is a sealed constant that tells a wrong
    /// passphrase from a damaged store.
    Passphrase {
        salt: String,
        m_cost: u32,
        t_cost: u32,
        p_cost: u32,
        check: String,
    },
}

/// The root key, in a secret mapping, wiped when the last holder drops it.
#[derive(Clone)]
pub struct RootKey(Arc<SecretBox<[u8; 32]>>);

impl RootKey {
    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }

    #[cfg(test)]
    pub fn for_test(b: [u8; 32]) -> RootKey {
        RootKey::from_slice(&b)
    }

    fn from_slice(b: &[u8]) -> RootKey {
        let mut k = SecretBox::new([0u8; 32]);
        k.copy_from_slice(b);
        RootKey(Arc::new(k))
    }
}

/// Root keys derived from the passphrase in this process, by their key-store parameters.
static DERIVED: Mutex<Vec<(String, RootKey)>> = Mutex::new(Vec::new());

fn no_passphrase() -> crate::Error {
    err!(
        KeyUnusable,
        "this key store is passphrase-protected: give the passphrase in a file (--passphrase-file or {}) or in {PASSPHRASE_ENV}",
        secret::PASSPHRASE_FILE_ENV
    )
}

const CHECK: &[u8] = b"encimg-root-check";

/// The key-derivation costs a key store may name: up to 256 MiB, 8 passes and 8 lanes (one
/// made here asks 64 MiB, 3 and 1). The parameters are read before anything can check them
/// (a key store in a bucket is authenticated under the key they derive), so bounds keep a
/// forged one from exhausting memory or time (about 2 s at most here).
const MAX_M_COST_KIB: u32 = 256 << 10;
const MAX_T_COST: u32 = 8;
const MAX_P_COST: u32 = 8;

fn derive(pass: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<RootKey> {
    if m > MAX_M_COST_KIB || t > MAX_T_COST || p > MAX_P_COST || m == 0 || t == 0 || p == 0 {
        return Err(err!(
            Corrupt,
            "the key store's key-derivation parameters are out of range (m={m} KiB, t={t}, p={p}): it is damaged or was altered"
        ));
    }
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| err!(Corrupt, "bad key-derivation parameters: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass, salt, &mut out[..])
        .map_err(|e| err!(InvalidInput, "key derivation failed: {e}"))?;
    let k = RootKey::from_slice(&out[..]);
    secret::scrub_stack();
    Ok(k)
}

/// Create the root key for a new key store in `dir`.
pub fn create(dir: &Path) -> Result<RootInfo> {
    let pass = secret::with_passphrase(|p| p.map(|p| Zeroizing::new(p.to_vec())));
    if let Some(pass) = pass {
        let mut salt = [0u8; 16];
        crypto::random_fill(&mut salt);
        let (m, t, p) = (64 * 1024, 3, 1);
        let root = derive(&pass, &salt, m, t, p)?;
        let check = crypto::seal_with_nonce(AeadKind::Aes256Gcm, root.bytes(), b"", CHECK)?;
        return Ok(RootInfo::Passphrase {
            salt: hex::encode(salt),
            m_cost: m,
            t_cost: t,
            p_cost: p,
            check: hex::encode(check),
        });
    }
    let path = dir.join("root.key");
    let key = crypto::random_secret(32);
    let mut f = sys::create_private(&path)?;
    f.write_all(&key)
        .and_then(|_| f.sync_all())
        .ctx(format!("writing {}", path.display()))?;
    sys::sync_dir(dir)?;
    Ok(RootInfo::File)
}

/// Obtain the root key of an existing key store.
pub fn open(dir: &Path, info: &RootInfo) -> Result<RootKey> {
    match info {
        RootInfo::File => {
            let path = dir.join("root.key");
            let f = sys::open_regular(&path, false).map_err(|e| e.context("root key"))?;
            let mode = f.metadata().ctx(path.display())?.mode();
            if mode & 0o077 != 0 {
                return Err(err!(
                    Refused,
                    "root key {} is accessible by group or others (mode {:04o}): run chmod 600 {}",
                    path.display(),
                    mode & 0o7777,
                    path.display()
                ));
            }
            let mut bytes = Zeroizing::new([0u8; 33]);
            let n = read_up_to(&f, &mut bytes[..]).ctx(format!("reading {}", path.display()))?;
            if n != 32 {
                return Err(err!(
                    Corrupt,
                    "root key {} is damaged (not 32 bytes)",
                    path.display()
                ));
            }
            Ok(RootKey::from_slice(&bytes[..32]))
        }
        RootInfo::Passphrase {
            salt,
            m_cost,
            t_cost,
            p_cost,
            check,
        } => {
            let id = format!("{salt}/{m_cost}/{t_cost}/{p_cost}/{check}");
            let mut cache = DERIVED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, k)) = cache.iter().find(|(i, _)| *i == id) {
                return Ok(k.clone());
            }
            let pass = secret::with_passphrase(|p| p.map(|p| Zeroizing::new(p.to_vec())))
                .ok_or_else(no_passphrase)?;
            let salt = hex::decode(salt).map_err(|_| err!(Corrupt, "key store salt is damaged"))?;
            let root = derive(&pass, &salt, *m_cost, *t_cost, *p_cost)?;
            let raw =
                hex::decode(check).map_err(|_| err!(Corrupt, "key store check is damaged"))?;
            if raw.len() < NONCE_LEN {
                return Err(err!(Corrupt, "key store check is damaged"));
            }
            crypto::open_with_nonce(AeadKind::Aes256Gcm, root.bytes(), b"", &raw)
                .map_err(|_| err!(KeyUnusable, "wrong passphrase for this key store"))?;
            cache.push((id, root.clone()));
            Ok(root)
        }
    }
}

/// Read into `buf` until it is full or the file ends; returns the bytes read.
fn read_up_to(mut f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
