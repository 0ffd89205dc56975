//! SM4 block throughput (ECB over the buffer, i.e. `encrypt_blocks`): `Sm4Fast` (its GFNI
//! kernel where the CPU has it), `Sm4Fast::portable` and the `sm4` crate, per 4 KiB and
//! 1 MiB; plus one `encrypt_block` (the XTS tweak cost).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use encimg::crypto::sm4_gfni::Sm4Fast;
use sm4::cipher::{BlockCipherEncrypt, KeyInit};

fn bench(c: &mut Criterion) {
    let key: [u8; 16] = core::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0xa5);
    let fast = Sm4Fast::new(&key);
    let krate = sm4::Sm4::new(&key.into());
    // "Sm4Fast-gfni-avx512vl" / "Sm4Fast-gfni-avx2" where the CPU has GFNI, and always
    // "Sm4Fast-portable".
    let gfni = format!("Sm4Fast-{}", fast.backend());
    let mut ours = vec![(gfni.clone(), Sm4Fast::new(&key))];
    if fast.accelerated() {
        ours.push(("Sm4Fast-portable".to_string(), Sm4Fast::portable(&key)));
    }

    let mut g = c.benchmark_group("sm4-encrypt_blocks");
    for (label, len) in [("4KiB", 4096usize), ("1MiB", 1 << 20)] {
        let mut buf = vec![0x5au8; len];
        g.throughput(Throughput::Bytes(len as u64));
        for (name, c) in &ours {
            g.bench_with_input(BenchmarkId::new(name, label), &len, |b, _| {
                b.iter(|| c.encrypt_blocks(&mut buf))
            });
        }
        g.bench_with_input(BenchmarkId::new("sm4-crate", label), &len, |b, _| {
            b.iter(|| {
                let (blocks, _) = sm4::cipher::Block::<sm4::Sm4>::slice_as_chunks_mut(&mut buf);
                krate.encrypt_blocks(blocks)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("sm4-encrypt_block");
    g.throughput(Throughput::Bytes(16));
    let mut block = [0x33u8; 16];
    g.bench_function(&gfni, |b| b.iter(|| fast.encrypt_block(&mut block)));
    g.bench_function("sm4-crate", |b| {
        b.iter(|| krate.encrypt_block((&mut block).into()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
