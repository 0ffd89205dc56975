//! XTS-AES-256 with VAES + AVX-512 + VPCLMULQDQ: four blocks per 512-bit register, 32
//! in flight, tweaks advanced four lanes at a time by multiplying each 128-bit lane by α⁴
//! (the technique of Linux's `aes-xts-avx-x86_64.S`). Used when the CPU has the features;
//! checked bit for bit against the portable path, `xts-mode`, IEEE 1619 vectors and OpenSSL.
//!
//! The AES-256 key schedule is expanded with AES-NI (`aeskeygenassist`); round keys live in
//! a struct that is zeroized on drop.

use core::arch::x86_64::*;

use zeroize::Zeroize;

/// Expanded AES-256 round keys for both XTS halves.
pub struct VaesXts {
    enc: [[u8; 16]; 15],
    dec: [[u8; 16]; 15],
    tweak: [[u8; 16]; 15],
}

impl Drop for VaesXts {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
        self.tweak.zeroize();
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

fn store(v: &[__m128i; 15]) -> [[u8; 16]; 15] {
    let mut out = [[0u8; 16]; 15];
    for (o, k) in out.iter_mut().zip(v) {
        // SAFETY: __m128i and [u8; 16] have the same size; any bit pattern is valid.
        *o = unsafe { core::mem::transmute::<__m128i, [u8; 16]>(*k) };
    }
    out
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
                enc: store(&enc),
                dec: store(&dec),
                tweak: store(&tweak),
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
        let keys = if encrypt { &self.enc } else { &self.dec };
        let mut rk = [_mm512_setzero_si512(); 15];
        let mut tk = [_mm_setzero_si128(); 15];
        for i in 0..15 {
            // SAFETY: 16-byte unaligned loads from arrays of 16 bytes.
            unsafe {
                rk[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(keys[i].as_ptr().cast()));
                tk[i] = _mm_loadu_si128(self.tweak[i].as_ptr().cast());
            }
        }
        for (n, sector) in buf.chunks_exact_mut(ss).enumerate() {
            let s = first.wrapping_add(n as u128);
            // T = AES-256(K2, sector number as 128-bit little endian).
            // SAFETY: 16-byte unaligned load from a local array.
            let mut t = unsafe { _mm_loadu_si128(s.to_le_bytes().as_ptr().cast()) };
            t = _mm_xor_si128(t, tk[0]);
            for k in &tk[1..14] {
                t = _mm_aesenc_si128(t, *k);
            }
            t = _mm_aesenclast_si128(t, tk[14]);
            // SAFETY: as above, the reverse way.
            let t0 = u128::from_le_bytes(unsafe { core::mem::transmute::<__m128i, [u8; 16]>(t) });
            let double = |x: u128| (x << 1) ^ ((x >> 127) * 0x87);
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
            xts_sector(sector, tw, &rk, encrypt);
        }
        // Round keys copied onto the stack are secrets too.
        wipe(&mut rk);
        wipe(&mut tk);
    }
}

/// Multiply each 128-bit lane by α⁴ in GF(2^128) (x^128 + x^7 + x^2 + x + 1).
#[target_feature(enable = "avx512f,vpclmulqdq")]
fn mul_alpha4(t: __m512i) -> __m512i {
    let carries = _mm512_srli_epi64::<60>(t); // top 4 bits of each qword
    let shifted = _mm512_slli_epi64::<4>(t);
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
fn xts_sector(sector: &mut [u8], mut tw: __m512i, rk: &[__m512i; 15], encrypt: bool) {
    // Eight registers (32 blocks) in flight hide the latency of vaesenc.
    let mut chunks = sector.chunks_exact_mut(512);
    for c in &mut chunks {
        tw = group::<8>(c, tw, rk, encrypt);
    }
    // What is left (sectors that are not a multiple of 512 bytes): one register at a time.
    for c in chunks.into_remainder().chunks_exact_mut(64) {
        tw = group::<1>(c, tw, rk, encrypt);
    }
}

/// XTS over `N` registers (64·N bytes of `c`) starting at tweak vector `tw`; returns the
/// tweak vector that follows.
#[target_feature(enable = "avx512f,vaes,vpclmulqdq")]
fn group<const N: usize>(c: &mut [u8], tw: __m512i, rk: &[__m512i; 15], encrypt: bool) -> __m512i {
    debug_assert_eq!(c.len(), 64 * N);
    let p = c.as_mut_ptr();
    let mut t = [tw; N];
    for i in 1..N {
        t[i] = mul_alpha4(t[i - 1]);
    }
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
    mul_alpha4(t[N - 1])
}
