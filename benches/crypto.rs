//! Sector crypto throughput: our XTS (bulk block path) against `xts-mode` over the same
//! block ciphers, per 512 B and 4 KiB sector and per 1 MiB batch.

use aes::cipher::KeyInit;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use encimg::crypto::{CipherKind, SectorCipher};

fn bench(c: &mut Criterion) {
    for kind in [CipherKind::AesXtsPlain64, CipherKind::Sm4XtsPlain64] {
        let key: Vec<u8> = (0..kind.key_len() as u8)
            .map(|i| i.wrapping_mul(29) ^ 0xa5)
            .collect();
        let ours = SectorCipher::new(kind, &key).unwrap();
        let h = key.len() / 2;
        let mut g = c.benchmark_group(kind.name());
        for (label, ss, total) in [
            ("512B", 512usize, 512usize),
            ("4KiB", 4096, 4096),
            ("1MiB-of-4KiB", 4096, 1 << 20),
        ] {
            let mut buf = vec![0x5au8; total];
            g.throughput(Throughput::Bytes(total as u64));
            g.bench_with_input(BenchmarkId::new("encimg", label), &ss, |b, &ss| {
                b.iter(|| ours.encrypt_sectors(&mut buf, ss, 7).unwrap())
            });
            macro_rules! crate_xts {
                ($c:ty) => {{
                    let x = xts_mode::Xts128::new(
                        <$c>::new_from_slice(&key[..h]).unwrap(),
                        <$c>::new_from_slice(&key[h..]).unwrap(),
                    );
                    g.bench_with_input(BenchmarkId::new("xts-mode", label), &ss, |b, &ss| {
                        b.iter(|| x.encrypt_area(&mut buf, ss, 7, xts_mode::get_tweak_default))
                    });
                }};
            }
            match kind {
                CipherKind::AesXtsPlain64 => crate_xts!(aes::Aes256),
                CipherKind::Sm4XtsPlain64 => crate_xts!(sm4::Sm4),
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
