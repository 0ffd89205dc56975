//! External key services: a KMIP server or a PKCS#11 token holds a region's CMKs (SPEC §8).
//! The CMK's material never leaves the service: encimg makes the data key and the service
//! wraps it (AES-GCM, under the header's associated data) and unwraps it. encimg keeps its
//! own record of each key (alias, description, tags, versions, its reversible Enabled /
//! Disabled / PendingDeletion state) in the region's key store; each version names the
//! service's object. The service's own state is checked at every use: a key an
//! administrator revoked, disabled or destroyed there is unusable here.
//!
//! One instance per service URI per process ([`service`]), so a mount keeps one connection
//! (KMIP) or one logged-in session (PKCS#11) however many stores name it.

pub mod kmip;
pub mod pkcs11;
mod ttlv;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::crypto::NONCE_LEN;
use crate::err;
use crate::error::Result;
use crate::kms::KeySpec;

/// A key's state as the service reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// KMIP Pre-Active.
    PreActive,
    /// Usable: KMIP Active, or PKCS#11 CKA_ENCRYPT and CKA_DECRYPT set.
    Active,
    /// KMIP Deactivated (revoked).
    Deactivated,
    /// KMIP Compromised.
    Compromised,
    /// PKCS#11: a usage attribute is off.
    Disabled,
    /// Destroyed, or no longer there.
    Gone,
}

impl ServiceState {
    pub fn name(self) -> &'static str {
        match self {
            ServiceState::PreActive => "Pre-Active",
            ServiceState::Active => "Active",
            ServiceState::Deactivated => "Deactivated",
            ServiceState::Compromised => "Compromised",
            ServiceState::Disabled => "Disabled",
            ServiceState::Gone => "Destroyed",
        }
    }
}

/// An external key service.
#[derive(Debug)]
pub enum External {
    Kmip(kmip::Kmip),
    Pkcs11(pkcs11::Token),
}

/// The service at `uri`, shared by everything in this process that names it.
pub fn service(uri: &str) -> Result<Arc<External>> {
    static SERVICES: OnceLock<Mutex<HashMap<String, Arc<External>>>> = OnceLock::new();
    let mut m = SERVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(s) = m.get(uri) {
        return Ok(s.clone());
    }
    let s = Arc::new(External::parse(uri)?);
    m.insert(uri.to_string(), s.clone());
    Ok(s)
}

impl External {
    /// Parse a service URI (`kmip://…` or `pkcs11:…`); nothing is contacted.
    pub fn parse(uri: &str) -> Result<External> {
        if uri.starts_with("kmip://") {
            Ok(External::Kmip(kmip::Kmip::new(kmip::KmipUri::parse(uri)?)))
        } else if uri.starts_with("pkcs11:") {
            Ok(External::Pkcs11(pkcs11::Token::new(
                pkcs11::Pkcs11Uri::parse(uri)?,
            )))
        } else {
            Err(err!(
                InvalidInput,
                "unknown key service '{uri}' (use local, kmip://HOST:PORT?ca=…&cert=…&key=… or pkcs11:module-path=…;token=…?pin-source=…)"
            ))
        }
    }

    /// How messages name the service.
    pub fn name(&self) -> String {
        match self {
            External::Kmip(k) => k.name(),
            External::Pkcs11(t) => t.name(),
        }
    }

    /// The canonical URI (file paths only: credentials stay in their files).
    pub fn uri(&self) -> String {
        match self {
            External::Kmip(k) => k.uri(),
            External::Pkcs11(t) => t.uri(),
        }
    }

    /// Make sure the service answers and can do what encimg asks of it.
    pub fn check(&self) -> Result<()> {
        match self {
            External::Kmip(_) => Ok(()),
            External::Pkcs11(t) => t.check_mechanisms(),
        }
    }

    /// A new usable key at the service; returns the service's id for it.
    pub fn create(&self, spec: KeySpec, label: &str) -> Result<String> {
        match self {
            External::Kmip(k) => k.create(spec, label),
            External::Pkcs11(t) => t.create(spec, label),
        }
    }

    /// Imported material as a usable key at the service (BYOK).
    pub fn register(&self, spec: KeySpec, label: &str, material: &[u8]) -> Result<String> {
        match self {
            External::Kmip(k) => k.register(spec, label, material),
            External::Pkcs11(t) => t.register(spec, label, material),
        }
    }

    /// Wrap a data key under the service's key `remote`: (nonce, ciphertext || tag).
    pub fn wrap(
        &self,
        remote: &str,
        spec: KeySpec,
        aad: &[u8],
        dek: &[u8],
    ) -> Result<([u8; NONCE_LEN], Vec<u8>)> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::crypto::random_fill(&mut nonce);
        let w = match self {
            External::Kmip(k) => k.encrypt(remote, spec, &nonce, aad, dek)?,
            External::Pkcs11(t) => t.encrypt(remote, &nonce, aad, dek)?,
        };
        Ok((nonce, w))
    }

    /// Unwrap a data key at the service.
    pub fn unwrap(
        &self,
        remote: &str,
        spec: KeySpec,
        nonce: &[u8],
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        match self {
            External::Kmip(k) => k.decrypt(remote, spec, nonce, aad, wrapped),
            External::Pkcs11(t) => t.decrypt(remote, nonce, aad, wrapped),
        }
    }

    pub fn state(&self, remote: &str) -> Result<ServiceState> {
        match self {
            External::Kmip(k) => k.state(remote),
            External::Pkcs11(t) => t.state(remote),
        }
    }

    /// Disable or enable the key at the service where the service can undo it (PKCS#11's
    /// usage attributes). KMIP has no way back from Revoke, so there encimg's record alone
    /// holds a reversible Disabled; returns whether the service changed.
    pub fn set_enabled(&self, remote: &str, on: bool) -> Result<bool> {
        match self {
            External::Kmip(_) => Ok(false),
            External::Pkcs11(t) => t.set_enabled(remote, on).map(|()| true),
        }
    }

    /// Destroy the key's material at the service.
    pub fn destroy(&self, remote: &str) -> Result<()> {
        match self {
            External::Kmip(k) => k.destroy(remote),
            External::Pkcs11(t) => t.destroy(remote),
        }
    }
}

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// What a service that did not answer in time is said to be (one place, so a listing can
/// tell "down" from a refusal of one key).
pub(crate) const UNREACHABLE: &str = "is unreachable:";

/// Whether an error message says a service did not answer (not that it refused).
pub fn is_unreachable_message(m: &str) -> bool {
    m.contains(UNREACHABLE)
}

/// Bound every wait on a key service (`--kms-timeout`, default 10 s).
pub fn set_timeout(d: Duration) {
    TIMEOUT_MS.store(d.as_millis().max(1) as u64, Ordering::Relaxed);
}

pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

/// Requests sent to key services by this process.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

/// Decode `%XX` escapes (URIs name files whose paths may hold reserved characters).
fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| err!(InvalidInput, "bad %-escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| err!(InvalidInput, "'{s}' is not UTF-8 once decoded"))
}
