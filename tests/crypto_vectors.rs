//! Known answers and differential tests for the sector ciphers and the key wrap:
//! IEEE 1619 XTS-AES-256 vectors, GB/T 32907 SM4 vectors (including the 1,000,000-iteration
//! one), OpenSSL's SM4-XTS (IEEE) and RFC 8998 SM4-GCM vectors, NIST GCM vectors, and
//! OpenSSL itself (through Python's `cryptography`) on random sectors and keys.

mod common;

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use encimg::crypto::{open, seal, AeadKind, CipherKind, CryptoError, SectorCipher};
use std::process::Command;

fn vectors(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/vectors/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.trim()).unwrap()
}

#[test]
fn ieee1619_xts_aes256() {
    let text = vectors("xts_aes256_ieee1619.txt");
    let mut n = 0;
    for block in text.split("\n\n") {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                .map(str::to_string)
        };
        let (Some(key), Some(sector), Some(pt), Some(ct)) = (
            field("Key"),
            field("Sector"),
            field("Plaintext"),
            field("Ciphertext"),
        ) else {
            continue;
        };
        let c = SectorCipher::new(CipherKind::AesXtsPlain64, &h(&key)).unwrap();
        let sector = u64::from_str_radix(&sector, 16).unwrap();
        let mut buf = h(&pt);
        c.encrypt_sectors(&mut buf, 512, sector).unwrap();
        assert_eq!(
            hex::encode(&buf),
            ct,
            "IEEE 1619 vector with sector {sector:x}"
        );
        c.decrypt_sectors(&mut buf, 512, sector).unwrap();
        assert_eq!(hex::encode(&buf), pt);
        n += 1;
    }
    assert_eq!(n, 3);
}

fn sm4_lines(prefix: &str) -> Vec<Vec<String>> {
    vectors("sm4.txt")
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn gbt32907_sm4_block() {
    for v in sm4_lines("Block = ") {
        let c = sm4::Sm4::new_from_slice(&h(&v[0])).unwrap();
        let mut b = aes::cipher::array::Array::try_from(&h(&v[1])[..]).unwrap();
        c.encrypt_block(&mut b);
        assert_eq!(hex::encode(b), v[2]);
    }
}

#[test]
fn gbt32907_sm4_million_iterations() {
    for v in sm4_lines("Iterated = ") {
        let c = sm4::Sm4::new_from_slice(&h(&v[0])).unwrap();
        let mut b = aes::cipher::array::Array::try_from(&h(&v[1])[..]).unwrap();
        let n: u32 = v[2].parse().unwrap();
        for _ in 0..n {
            c.encrypt_block(&mut b);
        }
        assert_eq!(hex::encode(b), v[3]);
    }
}

#[test]
fn openssl_sm4_xts_ieee() {
    let v = &sm4_lines("Xts = ")[0];
    let c = SectorCipher::new(CipherKind::Sm4XtsPlain64, &h(&v[0])).unwrap();
    let tweak = u128::from_le_bytes(h(&v[1]).try_into().unwrap());
    let mut buf = h(&v[2]);
    c.encrypt_with_tweak(&mut buf, 32, tweak).unwrap();
    assert_eq!(hex::encode(&buf), v[3]);
    c.decrypt_with_tweak(&mut buf, 32, tweak).unwrap();
    assert_eq!(hex::encode(&buf), v[2]);
}

#[test]
fn rfc8998_sm4_gcm() {
    let v = &sm4_lines("Gcm = ")[0];
    let nonce: [u8; 12] = h(&v[1]).try_into().unwrap();
    let out = seal(AeadKind::Sm4Gcm, &h(&v[0]), &nonce, &h(&v[2]), &h(&v[3])).unwrap();
    assert_eq!(hex::encode(&out), format!("{}{}", v[4], v[5]));
    let back = open(AeadKind::Sm4Gcm, &h(&v[0]), &nonce, &h(&v[2]), &out).unwrap();
    assert_eq!(hex::encode(&back[..]), v[3]);
}

#[test]
fn nist_aes256_gcm() {
    // NIST GCM spec test cases 13 and 14 (256-bit zero key, zero IV).
    let key = [0u8; 32];
    let nonce = [0u8; 12];
    let t13 = seal(AeadKind::Aes256Gcm, &key, &nonce, b"", b"").unwrap();
    assert_eq!(hex::encode(t13), "530f8afbc74536b9a963b4f1c4cb738b");
    let t14 = seal(AeadKind::Aes256Gcm, &key, &nonce, b"", &[0u8; 16]).unwrap();
    assert_eq!(
        hex::encode(t14),
        "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
    );
}

#[test]
fn aead_rejects_every_tampering() {
    for kind in [AeadKind::Aes256Gcm, AeadKind::Sm4Gcm] {
        let key = vec![7u8; kind.key_len()];
        let nonce = [9u8; 12];
        let ct = seal(
            kind,
            &key,
            &nonce,
            b"header",
            b"a data key of some length....",
        )
        .unwrap();
        assert!(open(kind, &key, &nonce, b"header", &ct).is_ok());
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert_eq!(
                open(kind, &key, &nonce, b"header", &bad).unwrap_err(),
                CryptoError::Auth
            );
        }
        assert!(open(kind, &key, &nonce, b"headeR", &ct).is_err());
        assert!(open(kind, &key, &[8u8; 12], b"header", &ct).is_err());
        assert!(open(kind, &key, &nonce, b"header", &ct[..10]).is_err());
        assert!(open(kind, &key, &nonce, b"header", &[]).is_err());
        assert!(open(kind, &key[1..], &nonce, b"header", &ct).is_err());
    }
}

/// OpenSSL's AES-XTS (via Python's cryptography) on random keys, sectors and sector numbers.
#[test]
fn agrees_with_openssl_aes_xts() {
    let script = r#"
import sys, os
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
for line in sys.stdin:
    key, ss, first, data = line.split()
    key, ss, first, data = bytes.fromhex(key), int(ss), int(first), bytes.fromhex(data)
    out = b''
    for i in range(len(data) // ss):
        e = Cipher(algorithms.AES(key), modes.XTS((first + i).to_bytes(16, 'little'))).encryptor()
        out += e.update(data[i*ss:(i+1)*ss]) + e.finalize()
    print(out.hex())
"#;
    let mut input = String::new();
    let mut cases = Vec::new();
    for i in 0..40u64 {
        let key = common::pattern(64, 1000 + i);
        if key[..32] == key[32..] {
            continue;
        }
        let ss = if i % 2 == 0 { 512 } else { 4096 };
        let first = match i % 4 {
            0 => i,
            1 => u64::MAX - i,
            2 => 1 << 40,
            _ => (i * 0x1234_5678_9abc) >> 3,
        };
        let data = common::pattern(ss * (1 + (i as usize % 3)), 2000 + i);
        input.push_str(&format!(
            "{} {ss} {first} {}\n",
            hex::encode(&key),
            hex::encode(&data)
        ));
        cases.push((key, ss, first, data));
    }
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with cryptography (installed by contrib/test.sh)");
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), cases.len());
    for ((key, ss, first, data), want) in cases.iter().zip(lines) {
        let c = SectorCipher::new(CipherKind::AesXtsPlain64, key).unwrap();
        let mut buf = data.clone();
        c.encrypt_sectors(&mut buf, *ss, *first).unwrap();
        assert_eq!(hex::encode(&buf), want, "ss={ss} first={first}");
    }
}
