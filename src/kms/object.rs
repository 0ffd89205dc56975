//! An object-storage region's key store, kept as an object beside its resources (SPEC §9:
//! "headers and key records are objects too"):
//!
//! ```text
//! PREFIX/keys/keystore.json   {"format": 1, "generation": N, "keystore": the key-store file
//!                              as a directory region has it (CMK material sealed under the
//!                              root key), "mac": hex(nonce || AES-256-GCM tag)}
//! ```
//!
//! The root key never goes to the bucket: it stays in the region's local directory
//! (`keys/root.key`, 0600) or is derived from the passphrase, so a host with the passphrase
//! (or a copy of the root-key file) opens the region from the bucket alone.
//!
//! - **Atomic.** Each update is one PUT of the whole object, conditional on the ETag read
//!   (`If-Match`; `If-None-Match: *` for the first): a writer on another host in between
//!   makes it fail as busy, nothing half-written.
//! - **Authenticated.** The tag covers the region's name, the generation and the key-store
//!   bytes under the root key: a state flipped in the bucket (a Disabled key turned
//!   Enabled) does not open.
//! - **Never rolled back.** The generation goes up by one per update and this host keeps
//!   the highest it has seen (`keys/generation`): an older object put back, authentic as it
//!   is, is refused.
//! - **Read once per moment.** A process keeps the object it read for [`FRESH`], unless this
//!   host wrote a later one meanwhile (`keys/generation` says so): a disable on this host
//!   cuts the next open, one on another host within [`FRESH`], as a cloud KMS's key-state
//!   changes take effect within a short delay. Updates always read the object anew.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RootKey;
use crate::crypto::{self, AeadKind};
use crate::err;
use crate::error::Result;
use crate::sys;

/// How long a process takes the object it read for the current one.
pub const FRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// The key store's object, relative to the region's prefix.
pub const OBJECT: &str = "keys/keystore.json";

/// The largest key-store object read (as the local file).
pub const MAX_BYTES: u64 = 64 << 20;

/// What `region remove` puts in the object's place, on condition it is the object it found
/// empty, and leaves there: a host that read the object before cannot write it back, one
/// that reads it now is told the region is gone, and `region add` writes over it.
pub const TOMBSTONE: &[u8] = b"{\"removed\": true}";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: u32,
    generation: u64,
    keystore: String,
    mac: String,
}

/// A key-store object as read: its key-store bytes, not yet authenticated.
#[derive(Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub generation: u64,
    pub etag: Option<String>,
    mac: String,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key-store object at generation {}", self.generation)
    }
}

fn aad(region: &str, generation: u64, bytes: &[u8]) -> Vec<u8> {
    let mut a = b"encimg-keystore-object\0".to_vec();
    a.extend_from_slice(region.as_bytes());
    a.push(0);
    a.extend_from_slice(&generation.to_le_bytes());
    a.extend_from_slice(bytes);
    a
}

/// Parse an object's bytes (`what` names it in errors).
pub fn parse(obj: &[u8], etag: Option<String>, what: &str) -> Result<Fetched> {
    let e: Envelope = serde_json::from_slice(obj)
        .map_err(|e| err!(Corrupt, "key store {what} is damaged: {e}"))?;
    if e.format != 1 {
        return Err(err!(
            Corrupt,
            "key store {what} has unsupported format {}",
            e.format
        ));
    }
    Ok(Fetched {
        bytes: e.keystore.into_bytes(),
        generation: e.generation,
        etag,
        mac: e.mac,
    })
}

/// The object for `bytes` (a key-store file) at `generation`, tagged under `root`.
pub fn seal(root: &RootKey, region: &str, generation: u64, bytes: &[u8]) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| err!(Corrupt, "key store is not UTF-8"))?
        .to_string();
    let tag = crypto::seal_with_nonce(
        AeadKind::Aes256Gcm,
        root.bytes(),
        &aad(region, generation, bytes),
        b"",
    )
    .map_err(|e| err!(Io, "tagging the key store: {e}"))?;
    serde_json::to_vec_pretty(&Envelope {
        format: 1,
        generation,
        keystore: text,
        mac: hex::encode(tag),
    })
    .map_err(|e| err!(Io, "{e}"))
}

impl Fetched {
    /// Check the tag under `root`, and that this host never saw a later generation (kept in
    /// `dir`, the region's local key directory); records this one as seen.
    pub fn verify(&self, root: &RootKey, region: &str, dir: &Path, what: &str) -> Result<()> {
        let raw = hex::decode(&self.mac).unwrap_or_default();
        let tag = crypto::open_with_nonce(
            AeadKind::Aes256Gcm,
            root.bytes(),
            &aad(region, self.generation, &self.bytes),
            &raw,
        );
        if tag.is_err() {
            return Err(err!(
                Corrupt,
                "key store {what} does not authenticate under region {region}'s root key: it was altered, or is another region's"
            ));
        }
        let seen = seen(dir);
        if self.generation < seen {
            return Err(err!(
                Corrupt,
                "key store {what} is at generation {}, older than the {seen} this host has seen: it was rolled back",
                self.generation
            ));
        }
        record_seen(dir, self.generation);
        Ok(())
    }
}

fn seen_path(dir: &Path) -> std::path::PathBuf {
    dir.join("generation")
}

/// The highest generation this host has seen of the key store (0: none).
pub fn seen(dir: &Path) -> u64 {
    sys::read_regular(&seen_path(dir), 64)
        .ok()
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
        .unwrap_or(0)
}

/// Remember `generation` as seen, if it is the highest yet.
pub fn record_seen(dir: &Path, generation: u64) {
    if generation > seen(dir) {
        if let Err(e) = sys::write_atomic(&seen_path(dir), generation.to_string().as_bytes()) {
            tracing::warn!("cannot record the key store's generation: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(b: u8) -> RootKey {
        RootKey::for_test([b; 32])
    }

    #[test]
    fn an_object_opens_under_its_root_and_region_only_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let ks = br#"{"format":1,"keys":[]}"#;
        let obj = seal(&root(1), "s3r", 5, ks).unwrap();
        let f = parse(&obj, None, "t").unwrap();
        assert_eq!((f.bytes.as_slice(), f.generation), (&ks[..], 5));
        assert!(f.verify(&root(2), "s3r", dir.path(), "t").is_err());
        assert!(f.verify(&root(1), "other", dir.path(), "t").is_err());
        f.verify(&root(1), "s3r", dir.path(), "t").unwrap();
        // One state flipped in the bucket.
        let text = String::from_utf8(obj.clone()).unwrap();
        let flipped = text.replace("\\\"keys\\\":[]", "\\\"keys\\\":[1]");
        assert_ne!(flipped, text);
        let f2 = parse(flipped.as_bytes(), None, "t").unwrap();
        let e = f2.verify(&root(1), "s3r", dir.path(), "t").unwrap_err();
        assert!(e.message.contains("does not authenticate"), "{}", e.message);
        // A later generation is seen; the earlier one, authentic, no longer opens.
        let newer = parse(&seal(&root(1), "s3r", 6, ks).unwrap(), None, "t").unwrap();
        newer.verify(&root(1), "s3r", dir.path(), "t").unwrap();
        let e = f.verify(&root(1), "s3r", dir.path(), "t").unwrap_err();
        assert!(e.message.contains("rolled back"), "{}", e.message);
        assert!(parse(b"{", None, "t").is_err());
    }
}
