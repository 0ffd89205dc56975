//! Data-key wrapping: AES-256-GCM under AES-256 master keys and SM4-GCM (RFC 8998) under SM4
//! master keys, both from the `aes-gcm` crate (its GCM is generic over any 128-bit block
//! cipher). 96-bit nonces, 128-bit tags; the tag is checked in constant time before anything
//! is decrypted, and the cipher states zeroize themselves on drop (`zeroize` features).

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use zeroize::Zeroizing;

use super::CryptoError;

/// Nonce length in bytes (96-bit GCM nonces).
pub const NONCE_LEN: usize = 12;
/// Tag length in bytes, appended to the ciphertext.
pub const TAG_LEN: usize = 16;

/// The AEAD of a master key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AeadKind {
    /// AES-256-GCM, 32-byte key.
    Aes256Gcm,
    /// SM4-GCM (RFC 8998), 16-byte key.
    Sm4Gcm,
}

impl AeadKind {
    /// Key length in bytes: 32 for AES-256-GCM, 16 for SM4-GCM.
    pub fn key_len(self) -> usize {
        match self {
            AeadKind::Aes256Gcm => 32,
            AeadKind::Sm4Gcm => 16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AeadKind::Aes256Gcm => "AES-256-GCM",
            AeadKind::Sm4Gcm => "SM4-GCM",
        }
    }
}

type Sm4Gcm = aes_gcm::AesGcm<sm4::Sm4, U12>;

/// A keyed AEAD (zeroized on drop). Short-lived, so the size difference is fine.
#[allow(clippy::large_enum_variant)]
enum Keyed {
    Aes(aes_gcm::Aes256Gcm),
    Sm4(Sm4Gcm),
}

impl Keyed {
    fn new(kind: AeadKind, key: &[u8]) -> Result<Self, CryptoError> {
        let err = |_| CryptoError::KeyLength {
            what: kind.name(),
            got: key.len(),
            expected: kind.key_len(),
        };
        Ok(match kind {
            AeadKind::Aes256Gcm => {
                Keyed::Aes(aes_gcm::Aes256Gcm::new_from_slice(key).map_err(err)?)
            }
            AeadKind::Sm4Gcm => Keyed::Sm4(Sm4Gcm::new_from_slice(key).map_err(err)?),
        })
    }

    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        p: Payload<'_, '_>,
    ) -> Result<Vec<u8>, aes_gcm::Error> {
        match self {
            Keyed::Aes(c) => c.encrypt(nonce.into(), p),
            Keyed::Sm4(c) => c.encrypt(nonce.into(), p),
        }
    }

    fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        p: Payload<'_, '_>,
    ) -> Result<Vec<u8>, aes_gcm::Error> {
        match self {
            Keyed::Aes(c) => c.decrypt(nonce.into(), p),
            Keyed::Sm4(c) => c.decrypt(nonce.into(), p),
        }
    }
}

/// Encrypt and authenticate `plaintext` with `aad`; returns ciphertext || tag
/// (`plaintext.len() + TAG_LEN` bytes). A wrong key length is `KeyLength`.
pub fn seal(
    kind: AeadKind,
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    // GCM only fails to encrypt inputs beyond 2^36 bytes, which never reach a key wrap.
    Keyed::new(kind, key)?
        .encrypt(nonce, payload)
        .map_err(|_| CryptoError::Length(plaintext.len()))
}

/// Verify and decrypt ciphertext || tag; the plaintext comes back in a buffer that is
/// zeroized on drop. Any mismatch (key, nonce, AAD, ciphertext, tag, or input shorter than
/// a tag) is `Auth`; a wrong key length is `KeyLength`. Never panics.
pub fn open(
    kind: AeadKind,
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let keyed = Keyed::new(kind, key)?;
    if ciphertext_and_tag.len() < TAG_LEN {
        return Err(CryptoError::Auth);
    }
    let payload = Payload {
        msg: ciphertext_and_tag,
        aad,
    };
    keyed
        .decrypt(nonce, payload)
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Auth)
}

/// [`seal`] under a fresh random nonce, returned in front: nonce || ciphertext || tag, the
/// form the key store keeps every sealed value in (CMK material, the passphrase check, the
/// tag of a key store kept as an object).
pub fn seal_with_nonce(
    kind: AeadKind,
    key: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    super::random_fill(&mut nonce);
    let ct = seal(kind, key, &nonce, aad, plaintext)?;
    Ok([&nonce[..], &ct].concat())
}

/// [`open`] of what [`seal_with_nonce`] made; anything too short is `Auth`.
pub fn open_with_nonce(
    kind: AeadKind,
    key: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let Some((nonce, rest)) = sealed.split_first_chunk::<NONCE_LEN>() else {
        return Err(CryptoError::Auth);
    };
    open(kind, key, nonce, aad, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_sealed_with_its_nonce_opens_once_whole() {
        let key = [7u8; 32];
        let kind = AeadKind::Aes256Gcm;
        let a = seal_with_nonce(kind, &key, b"aad", b"secret").unwrap();
        let b = seal_with_nonce(kind, &key, b"aad", b"secret").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN], "a fresh nonce each time");
        assert_eq!(
            &**open_with_nonce(kind, &key, b"aad", &a).unwrap(),
            b"secret"
        );
        assert_eq!(
            open_with_nonce(kind, &key, b"aaD", &a),
            Err(CryptoError::Auth)
        );
        for len in 0..NONCE_LEN + TAG_LEN {
            assert_eq!(
                open_with_nonce(kind, &key, b"aad", &a[..len]),
                Err(CryptoError::Auth)
            );
        }
    }

    #[test]
    fn round_trip_and_errors() {
        for kind in [AeadKind::Aes256Gcm, AeadKind::Sm4Gcm] {
            let key = vec![5u8; kind.key_len()];
            let n = [1u8; NONCE_LEN];
            let ct = seal(kind, &key, &n, b"aad", b"secret").unwrap();
            assert_eq!(ct.len(), 6 + TAG_LEN);
            assert_eq!(&**open(kind, &key, &n, b"aad", &ct).unwrap(), b"secret");
            assert_eq!(open(kind, &key, &n, b"aaD", &ct), Err(CryptoError::Auth));
            for len in 0..TAG_LEN {
                assert_eq!(
                    open(kind, &key, &n, b"aad", &ct[..len]),
                    Err(CryptoError::Auth)
                );
            }
            let short = &key[1..];
            let want = CryptoError::KeyLength {
                what: kind.name(),
                got: short.len(),
                expected: kind.key_len(),
            };
            assert_eq!(seal(kind, short, &n, b"", b"").unwrap_err(), want);
            assert_eq!(open(kind, short, &n, b"", &[]).unwrap_err(), want);
        }
    }
}
