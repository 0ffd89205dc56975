//! Data-key wrapping: AES-256-GCM under AES_256 CMKs and SM4-GCM (RFC 8998) under SM4 CMKs,
//! both from the `aes-gcm` crate (GCM is generic over any 128-bit block cipher).

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use zeroize::Zeroizing;

use super::CryptoError;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// The AEAD of a CMK spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AeadKind {
    Aes256Gcm,
    Sm4Gcm,
}

impl AeadKind {
    pub fn key_len(self) -> usize {
        match self {
            AeadKind::Aes256Gcm => 32,
            AeadKind::Sm4Gcm => 16,
        }
    }
}

type Sm4Gcm = aes_gcm::AesGcm<sm4::Sm4, U12>;

fn key_err(kind: AeadKind, got: usize) -> CryptoError {
    CryptoError::KeyLength {
        what: match kind {
            AeadKind::Aes256Gcm => "AES-256-GCM",
            AeadKind::Sm4Gcm => "SM4-GCM",
        },
        got,
        expected: kind.key_len(),
    }
}

/// Encrypt and authenticate; returns ciphertext || tag.
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
    let n = nonce.into();
    let r = match kind {
        AeadKind::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(key)
            .map_err(|_| key_err(kind, key.len()))?
            .encrypt(n, payload),
        AeadKind::Sm4Gcm => Sm4Gcm::new_from_slice(key)
            .map_err(|_| key_err(kind, key.len()))?
            .encrypt(n, payload),
    };
    r.map_err(|_| CryptoError::Auth)
}

/// Verify and decrypt ciphertext || tag; any mismatch is `Auth`.
pub fn open(
    kind: AeadKind,
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if ciphertext_and_tag.len() < TAG_LEN {
        return Err(CryptoError::Auth);
    }
    let payload = Payload {
        msg: ciphertext_and_tag,
        aad,
    };
    let n = nonce.into();
    let r = match kind {
        AeadKind::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(key)
            .map_err(|_| key_err(kind, key.len()))?
            .decrypt(n, payload),
        AeadKind::Sm4Gcm => Sm4Gcm::new_from_slice(key)
            .map_err(|_| key_err(kind, key.len()))?
            .decrypt(n, payload),
    };
    r.map(Zeroizing::new).map_err(|_| CryptoError::Auth)
}
