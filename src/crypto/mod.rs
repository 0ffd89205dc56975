//! Sector ciphers (XTS-AES-256, XTS-SM4), AEAD key wrapping (AES-256-GCM, SM4-GCM) and the
//! CSPRNG. Pure computation: no I/O lives here.

mod aead;
pub mod sm4_gfni;
mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;

pub use aead::{open, open_with_nonce, seal, seal_with_nonce, AeadKind, NONCE_LEN, TAG_LEN};
pub use xts::{CipherKind, SectorCipher, SHALLOW_STACK};

/// Errors from the crypto layer. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("invalid key length {got} for {what} (expected {expected})")]
    KeyLength {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("authentication failed: wrong key or tampered data")]
    Auth,
    #[error("buffer length {0} is not a whole number of sectors")]
    Length(usize),
}

/// Fill `buf` from the operating system's CSPRNG.
pub fn random_fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system CSPRNG failed");
}

/// A fresh random secret of `n` bytes, zeroized on drop.
pub fn random_secret(n: usize) -> zeroize::Zeroizing<Vec<u8>> {
    let mut v = zeroize::Zeroizing::new(vec![0u8; n]);
    random_fill(&mut v);
    v
}
