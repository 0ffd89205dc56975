//! Sector crypto throughput (bytes per second): our XTS against `xts-mode` over the same
//! block ciphers, for one 512 B sector, one 4 KiB sector and 1 MiB batches of each; plus
//! the raw block cipher (ECB over 4 KiB) as the ceiling our XTS can approach.
//!
//! `cargo bench --bench crypto [-- <filter>]`, e.g. `-- 'aes-xts-plain64/.*/4KiB'`.

use aes::cipher::array::Array;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use encimg::crypto::{CipherKind, SectorCipher};

fn bench(c: &mut Criterion) {
    for kind in [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64] {
        let key: Vec<u8> = (0..kind.key_len() as u8)
            .map(|i| i.wrapping_mul(29) ^ 0xa5)
            .collect();
        let ours = SectorCipher::new(kind, &key).unwrap();
        let (k1, k2) = key.split_at(key.len() / 2);
        let mut g = c.benchmark_group(kind.name());
        for (label, ss, total) in [
            ("512B", 512usize, 512usize),
            ("4KiB", 4096, 4096),
            ("1MiB-of-512B", 512, 1 << 20),
            ("1MiB-of-4KiB", 4096, 1 << 20),
        ] {
            let mut buf = vec![0x5au8; total];
            g.throughput(Throughput::Bytes(total as u64));
            g.bench_with_input(BenchmarkId::new("encimg", label), &ss, |b, &ss| {
                b.iter(|| ours.encrypt_sectors(&mut buf, ss, 1 << 33).unwrap())
            });
            macro_rules! crate_xts {
                ($c:ty) => {{
                    let x = xts_mode::Xts128::new(
                        <$c>::new_from_slice(k1).unwrap(),
                        <$c>::new_from_slice(k2).unwrap(),
                    );
                    g.bench_with_input(BenchmarkId::new("xts-mode", label), &ss, |b, &ss| {
                        b.iter(|| {
                            x.encrypt_area(&mut buf, ss, 1 << 33, xts_mode::get_tweak_default)
                        })
                    });
                }};
            }
            match kind {
                CipherKind::AesXtsPlain64 => crate_xts!(aes::Aes256),
                CipherKind::Sm4XtsPlain64 => crate_xts!(sm4::Sm4),
            }
        }
        // The block cipher alone, bulk ECB over 4 KiB: an upper bound for any XTS on it.
        let mut blocks = vec![Array::from([0x5au8; 16]); 256];
        g.throughput(Throughput::Bytes(4096));
        match kind {
            CipherKind::AesXtsPlain64 => {
                let e = aes::Aes256::new_from_slice(k1).unwrap();
                g.bench_function("ecb-bound/4KiB", |b| {
                    b.iter(|| e.encrypt_blocks(&mut blocks))
                });
            }
            CipherKind::Sm4XtsPlain64 => {
                let e = sm4::Sm4::new_from_slice(k1).unwrap();
                g.bench_function("ecb-bound/4KiB", |b| {
                    b.iter(|| e.encrypt_blocks(&mut blocks))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
