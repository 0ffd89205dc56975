//! XTS-AES-256 with VAES + AVX-512 + VPCLMULQDQ: four blocks per 512-bit register, 32
//! in flight, tweaks advanced four lanes at a time by multiplying each 128-bit lane by α⁴
//! (the technique of Linux's `aes-xts-avx-x86_64.S`). Used when the CPU has the features;
//! checked bit for bit against the portable path, `xts-mode`, IEEE 1619 vectors and OpenSSL.
//!
//! The AES-256 key schedule is expanded with AES-NI (`aeskeygenassist`); round keys live in
//! a struct that is zeroized on drop.

use core::arch::x86_64::*;

use super::xts::double;

/// Expanded AES-256 round keys for both XTS halves, each broadcast to the four 128-bit
/// lanes of a zmm register (so a run uses them in place, with nothing to copy or wipe).
pub struct VaesXts {
    enc: [__m512i; 15],
    dec: [__m512i; 15],
    tweak: [__m512i; 15],
}

impl Drop for VaesXts {
    fn drop(&mut self) {
        wipe(&mut self.enc);
        wipe(&mut self.dec);
        wipe(&mut self.tweak);
    }
}

/// Overwrite a stack array of key material with zeros, in a way the optimizer keeps.
fn wipe<T>(a: &mut T) {
    // SAFETY: `a` is a valid, exclusive reference to a plain-data value (SIMD registers or
    // byte arrays), for which all-zero bytes are a valid value.
    unsafe { zeroize::zeroize_flat_type(a as *mut T) }
}

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    std::is_x86_feature_detected!("aes")
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("vaes")
        && std::is_x86_feature_detected!("vpclmulqdq")
}

#[target_feature(enable = "aes,sse2")]
fn expand_half(a: __m128i, t: __m128i) -> __m128i {
    let mut a = a;
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    _mm_xor_si128(a, t)
}

macro_rules! round_pair {
    ($rk:ident, $i:expr, $rcon:expr) => {{
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($rk[2 * $i - 1]));
        $rk[2 * $i] = expand_half($rk[2 * $i - 2], t);
        if 2 * $i + 1 < 15 {
            let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>($rk[2 * $i]));
            $rk[2 * $i + 1] = expand_half($rk[2 * $i - 1], t);
        }
    }};
}

/// The 15 AES-256 encryption round keys of `key` (32 bytes).
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8]) -> [__m128i; 15] {
    let mut rk = [_mm_setzero_si128(); 15];
    // SAFETY: key has 32 bytes (checked by the caller); unaligned loads.
    unsafe {
        rk[0] = _mm_loadu_si128(key.as_ptr().cast());
        rk[1] = _mm_loadu_si128(key.as_ptr().add(16).cast());
    }
    round_pair!(rk, 1, 0x01);
    round_pair!(rk, 2, 0x02);
    round_pair!(rk, 3, 0x04);
    round_pair!(rk, 4, 0x08);
    round_pair!(rk, 5, 0x10);
    round_pair!(rk, 6, 0x20);
    round_pair!(rk, 7, 0x40);
    rk
}

#[target_feature(enable = "avx512f")]
fn broadcast(v: &[__m128i; 15]) -> [__m512i; 15] {
    v.map(|k| _mm512_broadcast_i32x4(k))
}

impl VaesXts {
    /// Expand a 64-byte XTS-AES-256 key; `None` where the CPU lacks the features or the
    /// key is not 64 bytes.
    pub fn new(key: &[u8]) -> Option<VaesXts> {
        if key.len() != 64 || !available() {
            return None;
        }
        // SAFETY: available() confirmed AES-NI, AVX-512F, VAES and VPCLMULQDQ.
        unsafe {
            let mut enc = expand(&key[..32]);
            let mut tweak = expand(&key[32..]);
            let mut dec = [_mm_setzero_si128(); 15];
            dec[0] = enc[14];
            for i in 1..14 {
                dec[i] = _mm_aesimc_si128(enc[14 - i]);
            }
            dec[14] = enc[0];
            let out = VaesXts {
                enc: broadcast(&enc),
                dec: broadcast(&dec),
                tweak: broadcast(&tweak),
            };
            wipe(&mut enc);
            wipe(&mut dec);
            wipe(&mut tweak);
            Some(out)
        }
    }

    /// Encrypt (or decrypt) whole sectors of `ss` bytes, first tweak `first`. `ss` must be a
    /// multiple of 64 and `buf` whole sectors (the caller checks; anything else panics
    /// rather than leave bytes unencrypted).
    pub fn run(&self, buf: &mut [u8], ss: usize, first: u128, encrypt: bool) {
        assert!(ss > 0 && ss.is_multiple_of(64) && buf.len().is_multiple_of(ss));
        // SAFETY: a VaesXts exists only where available() held (see new).
        unsafe { self.run_inner(buf, ss, first, encrypt) }
    }

    #[target_feature(enable = "aes,avx512f,vaes,vpclmulqdq")]
    fn run_inner(&self, buf: &mut [u8], ss: usize, first: u128, encrypt: bool) {
        let rk = if encrypt { &self.enc } else { &self.dec };
        // Tweaks of four sectors at a time: T = AES-256(K2, sector number, little endian),
        // one lane each, so their rounds overlap instead of running one chain per sector.
        for (n, sectors) in buf.chunks_mut(4 * ss).enumerate() {
            let s0 = first.wrapping_add(4 * n as u128);
            let numbers = [0u128, 1, 2, 3].map(|i| s0.wrapping_add(i).to_le_bytes());
            // SAFETY: 64-byte unaligned load from a local array of 64 bytes.
            let mut t = [unsafe { _mm512_loadu_si512(numbers.as_ptr().cast()) }];
            rounds(&mut t, &self.tweak, true);
            let mut tweaks = [[0u8; 16]; 4];
            // SAFETY: 64-byte unaligned store into a local array of 64 bytes.
            unsafe { _mm512_storeu_si512(tweaks.as_mut_ptr().cast(), t[0]) };
            for (sector, tweak) in sectors.chunks_exact_mut(ss).zip(&tweaks) {
                let t0 = u128::from_le_bytes(*tweak);
                let t1 = double(t0);
                let t2 = double(t1);
                let t3 = double(t2);
                let lanes = [
                    t0.to_le_bytes(),
                    t1.to_le_bytes(),
                    t2.to_le_bytes(),
                    t3.to_le_bytes(),
                ];
                // SAFETY: 64-byte unaligned load from a local array of 64 bytes.
                let tw = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
                xts_sector(sector, tw, rk, encrypt);
            }
            // Tweaks are not secret, but keep the habit: nothing derived from keys lingers.
            wipe(&mut tweaks);
        }
    }
}

/// Multiply each 128-bit lane by α^K in GF(2^128) (x^128 + x^7 + x^2 + x + 1), for K in
/// 1..=56 (the bits carried out, times 0x87, must fit one 64-bit carry-less product).
#[target_feature(enable = "avx512f,vpclmulqdq")]
fn mul_alpha<const K: u32, const R: u32>(t: __m512i) -> __m512i {
    const { assert!(K >= 1 && K <= 56 && R == 64 - K) };
    let carries = _mm512_srli_epi64::<R>(t); // top K bits of each qword
    let shifted = _mm512_slli_epi64::<K>(t);
    let swapped = _mm512_shuffle_epi32::<0x4e>(carries); // [c_hi, c_lo] per lane
                                                         // c_lo moves into the high qword as is; c_hi wraps around into the low one times 0x87.
    let hi_mask = _mm512_set_epi64(-1, 0, -1, 0, -1, 0, -1, 0);
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    let wrap = _mm512_clmulepi64_epi128::<0x00>(swapped, poly);
    _mm512_xor_si512(
        _mm512_xor_si512(shifted, wrap),
        _mm512_and_si512(swapped, hi_mask),
    )
}

#[target_feature(enable = "avx512f,vaes")]
fn rounds<const N: usize>(x: &mut [__m512i; N], rk: &[__m512i; 15], encrypt: bool) {
    for v in x.iter_mut() {
        *v = _mm512_xor_si512(*v, rk[0]);
    }
    if encrypt {
        for k in &rk[1..14] {
            for v in x.iter_mut() {
                *v = _mm512_aesenc_epi128(*v, *k);
            }
        }
        for v in x.iter_mut() {
            *v = _mm512_aesenclast_epi128(*v, rk[14]);
        }
    } else {
        for k in &rk[1..14] {
            for v in x.iter_mut() {
                *v = _mm512_aesdec_epi128(*v, *k);
            }
        }
        for v in x.iter_mut() {
            *v = _mm512_aesdeclast_epi128(*v, rk[14]);
        }
    }
}

#[target_feature(enable = "avx512f,vaes,vpclmulqdq")]
fn xts_sector(sector: &mut [u8], tw: __m512i, rk: &[__m512i; 15], encrypt: bool) {
    // Eight registers (32 blocks) in flight hide the latency of vaesenc. Each register's
    // tweaks advance by α³² from one 512-byte chunk to the next: eight independent
    // multiplications rather than one chain through all of them.
    let mut t = [tw; 8];
    for i in 1..8 {
        t[i] = mul_alpha::<4, 60>(t[i - 1]);
    }
    let mut chunks = sector.chunks_exact_mut(512);
    for c in &mut chunks {
        group(c, &t, rk, encrypt);
        for v in t.iter_mut() {
            *v = mul_alpha::<32, 32>(*v);
        }
    }
    // What is left (sectors that are not a multiple of 512 bytes): one register at a time,
    // from the tweaks of the block after the last chunk.
    let mut tw = [t[0]];
    for c in chunks.into_remainder().chunks_exact_mut(64) {
        group(c, &tw, rk, encrypt);
        tw[0] = mul_alpha::<4, 60>(tw[0]);
    }
}

/// XTS over `N` registers (64·N bytes of `c`) with tweak vectors `t`.
#[target_feature(enable = "avx512f,vaes")]
fn group<const N: usize>(c: &mut [u8], t: &[__m512i; N], rk: &[__m512i; 15], encrypt: bool) {
    debug_assert_eq!(c.len(), 64 * N);
    let p = c.as_mut_ptr();
    let mut x = [_mm512_setzero_si512(); N];
    for i in 0..N {
        // SAFETY: c has 64·N bytes; register i covers bytes 64·i..64·i+64.
        x[i] = _mm512_xor_si512(unsafe { _mm512_loadu_si512(p.add(64 * i).cast()) }, t[i]);
    }
    rounds(&mut x, rk, encrypt);
    for i in 0..N {
        // SAFETY: as above.
        unsafe { _mm512_storeu_si512(p.add(64 * i).cast(), _mm512_xor_si512(x[i], t[i])) };
    }
}
