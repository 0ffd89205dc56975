//! The key-store root key: a 32-byte key that seals every CMK's material. By default it is
//! a 0600 file `keys/root.key`; when `ENCIMG_PASSPHRASE` is set at `init`, it is derived
//! from that passphrase with Argon2id instead and never stored.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, AeadKind, NONCE_LEN};
use crate::err;
use crate::error::{IoContext, Result};
use crate::sys;

/// Name of the environment variable holding the passphrase.
pub const PASSPHRASE_ENV: &str = "ENCIMG_PASSPHRASE";

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

/// The root key, zeroized on drop.
pub struct RootKey(Zeroizing<[u8; 32]>);

impl RootKey {
    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

const CHECK: &[u8] = b"encimg-root-check";

fn derive(pass: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<RootKey> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| err!(Corrupt, "bad key-derivation parameters: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass, salt, &mut out[..])
        .map_err(|e| err!(InvalidInput, "key derivation failed: {e}"))?;
    Ok(RootKey(out))
}

/// Create the root key for a new key store in `dir`.
pub fn create(dir: &Path) -> Result<RootInfo> {
    if let Ok(pass) = std::env::var(PASSPHRASE_ENV) {
        let pass = Zeroizing::new(pass);
        if pass.is_empty() {
            return Err(err!(InvalidInput, "{PASSPHRASE_ENV} is empty"));
        }
        let mut salt = [0u8; 16];
        crypto::random_fill(&mut salt);
        let (m, t, p) = (64 * 1024, 3, 1);
        let root = derive(pass.as_bytes(), &salt, m, t, p)?;
        let mut nonce = [0u8; NONCE_LEN];
        crypto::random_fill(&mut nonce);
        let check = crypto::seal(AeadKind::Aes256Gcm, root.bytes(), &nonce, b"", CHECK)?;
        return Ok(RootInfo::Passphrase {
            salt: hex::encode(salt),
            m_cost: m,
            t_cost: t,
            p_cost: p,
            check: hex::encode([&nonce[..], &check].concat()),
        });
    }
    let path = dir.join("root.key");
    let key = crypto::random_secret(32);
    let mut f = sys::private_file_options()
        .write(true)
        .create_new(true)
        .open(&path)
        .ctx(format!("creating {}", path.display()))?;
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
            let bytes = Zeroizing::new(std::fs::read(&path).map_err(|e| {
                crate::error::Error::from(e).context(format!("reading root key {}", path.display()))
            })?);
            if bytes.len() != 32 {
                return Err(err!(
                    Corrupt,
                    "root key {} is damaged (not 32 bytes)",
                    path.display()
                ));
            }
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&bytes);
            Ok(RootKey(k))
        }
        RootInfo::Passphrase {
            salt,
            m_cost,
            t_cost,
            p_cost,
            check,
        } => {
            let pass = Zeroizing::new(std::env::var(PASSPHRASE_ENV).map_err(|_| {
                err!(
                    KeyUnusable,
                    "this key store is passphrase-protected: set {PASSPHRASE_ENV}"
                )
            })?);
            let salt = hex::decode(salt).map_err(|_| err!(Corrupt, "key store salt is damaged"))?;
            let root = derive(pass.as_bytes(), &salt, *m_cost, *t_cost, *p_cost)?;
            let raw =
                hex::decode(check).map_err(|_| err!(Corrupt, "key store check is damaged"))?;
            if raw.len() < NONCE_LEN {
                return Err(err!(Corrupt, "key store check is damaged"));
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&raw[..NONCE_LEN]);
            crypto::open(
                AeadKind::Aes256Gcm,
                root.bytes(),
                &nonce,
                b"",
                &raw[NONCE_LEN..],
            )
            .map_err(|_| err!(KeyUnusable, "wrong passphrase for this key store"))?;
            Ok(root)
        }
    }
}
