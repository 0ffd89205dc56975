//! SM4 (GB/T 32907-2016) with a constant-time GFNI kernel: 64 blocks in flight in ymm
//! registers, with AVX2 (or, where the CPU has it, AVX-512VL for rotates and three-way
//! xors on the same ymm registers), or 128 in zmm registers where the CPU has AVX-512BW
//! (the same layout with four 128-bit lanes to a register).
//!
//! The SM4 S-box is affine-equivalent to inversion in GF(2^8): `S(x) = A·I(A·x + C) + C`
//! with `I` the inverse modulo x^8+x^7+x^6+x^5+x^4+x^2+1 (0x1f5), `A` the circulant bit
//! matrix whose row i is `0xa7` rotated left by i, and `C = 0xd3`. A field isomorphism `T`
//! from that field to the AES field (0x11b) turns it into
//! `S(x) = (A·T⁻¹)·I_aes((T·A)·x + T·C) + C`: one `gf2p8affineqb` then one
//! `gf2p8affineinvqb` per byte vector, so no table is indexed by secret data, in the rounds
//! or in the key schedule. The constants are the ones libgcrypt's `sm4-gfni-avx2-amd64.S`
//! uses (`.Lpre_affine_s` with 0x65, `.Lpost_affine_s` with 0xd3); the tests re-derive
//! them from the S-box structure (`T` sends x to 0xd6, a root of 0x1f5 in the AES field)
//! and check all 256 S-box values, in a software model of the instructions and on the CPU.
//!
//! The kernel byte-swaps the big-endian words, transposes 4×4 dwords inside each 128-bit
//! lane so that register j of a set holds word j of eight blocks, runs the 32 rounds on up
//! to eight such sets at once (the rounds are latency-bound; more sets in flight hide it),
//! and undoes the transpose. A short remainder (fewer than 64 blocks) runs as one call with
//! as many sets as it needs, its last partial set through a zero-padded stack block.
//!
//! CPUs without GFNI/AVX2 (detected once, when the key is set) use the RustCrypto `sm4`
//! crate, which is correct but not constant-time: it indexes its S-box table with
//! key- and data-dependent bytes, in the rounds and in the key schedule.
//!
//! `Sm4Fast` also implements the `cipher` traits (`KeyInit`, `BlockCipherEncrypt`,
//! `BlockCipherDecrypt`), so code generic over `sm4::Sm4` (the XTS layer) can use it as is.

use sm4::cipher::consts::U16;
use sm4::cipher::{
    BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncClosure, BlockCipherEncrypt,
    BlockSizeUser, Key, KeyInit, KeySizeUser,
};
use zeroize::Zeroize;

/// SM4 with a GFNI/AVX2 kernel when the CPU has it, else the `sm4` crate.
///
/// `Send + Sync`; round keys are zeroized on drop.
pub struct Sm4Fast {
    inner: Inner,
}

enum Inner {
    /// Round keys for the GFNI kernel at the level `new` detected, held inline: an
    /// `Sm4Fast` lives inside its owner's secret mapping (`SectorCipher` keeps its schedules
    /// in a `SecretBox`), and a heap box would put the round keys outside it. Whoever moves
    /// one scrubs the stack after (as `SectorCipher::new` does).
    #[cfg(target_arch = "x86_64")]
    Gfni(RoundKeys, x86::Level),
    /// The RustCrypto cipher (zeroizes itself on drop: the crate's `zeroize` feature).
    Portable(sm4::Sm4),
}

/// Encryption round keys, and the same in reverse order for decryption.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Default)]
struct RoundKeys {
    enc: [u32; 32],
    dec: [u32; 32],
}

impl core::fmt::Debug for Sm4Fast {
    /// The code path only; never key material.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm4Fast")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Drop for RoundKeys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
    }
}

/// `T·A` (SM4 field to AES field, after SM4's input affine map), in GFNI's encoding: byte
/// 7 - i of the qword is the matrix row giving output bit i.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PRE_AFFINE: i64 = 0x34ac_259e_022d_bc52;
/// `T·C`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PRE_CONST: i32 = 0x65;
/// `A·T⁻¹` (AES field back to the SM4 field, then SM4's output affine map).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const POST_AFFINE: i64 = 0xd72d_8e51_1e6c_8b19_u64 as i64;
/// `C`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const POST_CONST: i32 = 0xd3;

/// The system parameter FK.
const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];

/// The fixed parameter CK_i: byte j of CK_i is (4i + j)·7 mod 256.
const fn ck(i: usize) -> u32 {
    let mut w = 0u32;
    let mut j = 0;
    while j < 4 {
        w = (w << 8) | (((4 * i + j) * 7) & 0xff) as u32;
        j += 1;
    }
    w
}

/// Key schedule: `rk_i = K_{i+4} = K_i ^ T'(K_{i+1} ^ K_{i+2} ^ K_{i+3} ^ CK_i)`, with
/// `T'(x) = L'(τ(x))`, `L'(b) = b ^ (b <<< 13) ^ (b <<< 23)`; `tau` is the S-box on the four
/// bytes of a word.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn key_schedule(key: &[u8; 16], tau: impl Fn(u32) -> u32, rk: &mut RoundKeys) {
    let mut k = [0u32; 4];
    for (i, w) in k.iter_mut().enumerate() {
        *w = u32::from_be_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]])
            ^ FK[i];
    }
    for i in 0..32 {
        let b = tau(k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck(i));
        k[i % 4] ^= b ^ b.rotate_left(13) ^ b.rotate_left(23);
        rk.enc[i] = k[i % 4];
        rk.dec[31 - i] = k[i % 4];
    }
    k.zeroize();
}

impl Sm4Fast {
    /// Key the cipher, with the GFNI kernel when this CPU has GFNI and AVX2 (checked here,
    /// once).
    pub fn new(key: &[u8; 16]) -> Sm4Fast {
        #[cfg(target_arch = "x86_64")]
        if let Some(level) = x86::detect() {
            return Self::with_level(key, level);
        }
        Self::portable(key)
    }

    /// Key the GFNI kernel at `level`, which the caller has checked this CPU supports.
    #[cfg(target_arch = "x86_64")]
    fn with_level(key: &[u8; 16], level: x86::Level) -> Sm4Fast {
        debug_assert!(x86::supports(level));
        let mut rk = RoundKeys::default();
        // SAFETY: the caller checked that the CPU supports `level`, which includes AVX2 and
        // GFNI.
        unsafe { x86::round_keys(key, &mut rk) };
        Sm4Fast {
            inner: Inner::Gfni(rk, level),
        }
    }

    /// Key the cipher on the portable path (the `sm4` crate) whatever the CPU: for tests,
    /// benchmarks and as an escape hatch.
    pub fn portable(key: &[u8; 16]) -> Sm4Fast {
        Sm4Fast {
            inner: Inner::Portable(sm4::Sm4::new(key.into())),
        }
    }

    /// Whether the GFNI kernel is used.
    pub fn accelerated(&self) -> bool {
        !matches!(self.inner, Inner::Portable(_))
    }

    /// The code path in use: `"gfni-avx512"`, `"gfni-avx512vl"`, `"gfni-avx2"` or
    /// `"portable"` (for logs and benchmark labels).
    pub fn backend(&self) -> &'static str {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(_, x86::Level::Avx512) => "gfni-avx512",
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(_, x86::Level::Avx512Vl) => "gfni-avx512vl",
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(_, x86::Level::Avx2) => "gfni-avx2",
            Inner::Portable(_) => "portable",
        }
    }

    /// Encrypt whole 16-byte blocks in place (ECB over the buffer). `buf.len()` must be a
    /// multiple of 16; trailing bytes are left untouched (a debug assertion).
    pub fn encrypt_blocks(&self, buf: &mut [u8]) {
        self.blocks(buf, true);
    }

    /// Decrypt whole 16-byte blocks in place; the same length rules as `encrypt_blocks`.
    pub fn decrypt_blocks(&self, buf: &mut [u8]) {
        self.blocks(buf, false);
    }

    fn blocks(&self, buf: &mut [u8], encrypt: bool) {
        debug_assert!(
            buf.len().is_multiple_of(16),
            "SM4 buffer of {} bytes",
            buf.len()
        );
        let n = buf.len() / 16 * 16;
        let buf = &mut buf[..n];
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(rk, level) => {
                let rk = if encrypt { &rk.enc } else { &rk.dec };
                // SAFETY: `Gfni` is only built for a level the CPU supports.
                unsafe { x86::crypt(*level, rk, buf) }
            }
            Inner::Portable(c) if encrypt => c.encrypt_blocks(as_blocks(buf)),
            Inner::Portable(c) => c.decrypt_blocks(as_blocks(buf)),
        }
    }

    /// Encrypt one block in place (XTS tweaks).
    pub fn encrypt_block(&self, block: &mut [u8; 16]) {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Gfni` is only built for a level the CPU supports.
            Inner::Gfni(rk, level) => unsafe { x86::crypt_one(*level, &rk.enc, block) },
            Inner::Portable(c) => c.encrypt_block(block.into()),
        }
    }

    /// Decrypt one block in place.
    pub fn decrypt_block(&self, block: &mut [u8; 16]) {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Gfni` is only built for a level the CPU supports.
            Inner::Gfni(rk, level) => unsafe { x86::crypt_one(*level, &rk.dec, block) },
            Inner::Portable(c) => c.decrypt_block(block.into()),
        }
    }
}

/// An SM4 block, as the `cipher` traits see it.
type Block = sm4::cipher::Block<sm4::Sm4>;

fn as_blocks(buf: &mut [u8]) -> &mut [Block] {
    let (blocks, rest) = Block::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty());
    blocks
}

// The RustCrypto `cipher` traits, so that generic code written for `sm4::Sm4` (the XTS
// layer) takes an `Sm4Fast` unchanged. Their `encrypt_block`/`encrypt_blocks` take
// `Block`s; the inherent methods above (byte arrays and slices) win where both would fit.
// The kernel's backend has a parallel width of 64 blocks (one pass of its main loop) and
// runs a shorter tail in one call.

impl KeySizeUser for Sm4Fast {
    type KeySize = U16;
}

impl KeyInit for Sm4Fast {
    fn new(key: &Key<Self>) -> Self {
        Sm4Fast::new(&key.0)
    }
}

impl BlockSizeUser for Sm4Fast {
    type BlockSize = U16;
}

impl BlockCipherEncrypt for Sm4Fast {
    fn encrypt_with_backend(&self, f: impl BlockCipherEncClosure<BlockSize = U16>) {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(rk, level) => {
                let backend = x86::Backend {
                    rk: &rk.enc,
                    level: *level,
                };
                // SAFETY: `Gfni` is only built for a level the CPU supports, and every level
                // includes AVX2 and GFNI.
                unsafe { x86::call_enc(f, &backend) }
            }
            Inner::Portable(c) => c.encrypt_with_backend(f),
        }
    }
}

impl BlockCipherDecrypt for Sm4Fast {
    fn decrypt_with_backend(&self, f: impl BlockCipherDecClosure<BlockSize = U16>) {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Gfni(rk, level) => {
                let backend = x86::Backend {
                    rk: &rk.dec,
                    level: *level,
                };
                // SAFETY: as for encryption.
                unsafe { x86::call_dec(f, &backend) }
            }
            Inner::Portable(c) => c.decrypt_with_backend(f),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use sm4::cipher::consts::{U128, U16};
    use sm4::cipher::inout::{InOut, InOutBuf};
    use sm4::cipher::{
        BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherEncBackend, BlockCipherEncClosure,
        BlockSizeUser, ParBlocks, ParBlocksSizeUser,
    };
    use zeroize::Zeroize;

    use super::{Block, RoundKeys, POST_AFFINE, POST_CONST, PRE_AFFINE, PRE_CONST};

    /// Which round function the kernel uses. Both need GFNI and AVX2.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Level {
        /// Rotates from shifts and byte shuffles, two-input xors.
        Avx2,
        /// `vprold` rotates and `vpternlogd` three-way xors (AVX-512F + VL) on ymm registers,
        /// and 32 of them.
        Avx512Vl,
        /// The same round on zmm registers: sixteen blocks to a register, twice the work
        /// per instruction (AVX-512F + BW for the byte shuffles).
        Avx512,
    }

    /// The best level this CPU supports, if any.
    pub(super) fn detect() -> Option<Level> {
        [Level::Avx512, Level::Avx512Vl, Level::Avx2]
            .into_iter()
            .find(|&l| supports(l))
    }

    pub(super) fn supports(level: Level) -> bool {
        let base = std::is_x86_feature_detected!("gfni") && std::is_x86_feature_detected!("avx2");
        let vl = base
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl");
        match level {
            Level::Avx2 => base,
            Level::Avx512Vl => vl,
            Level::Avx512 => vl && std::is_x86_feature_detected!("avx512bw"),
        }
    }

    /// Register sets (8 blocks each) in flight in the main loop.
    const SETS: usize = 8;

    /// The SM4 S-box on every byte.
    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    pub(super) fn sbox(x: __m256i) -> __m256i {
        let x = _mm256_gf2p8affine_epi64_epi8::<PRE_CONST>(x, _mm256_set1_epi64x(PRE_AFFINE));
        _mm256_gf2p8affineinv_epi64_epi8::<POST_CONST>(x, _mm256_set1_epi64x(POST_AFFINE))
    }

    /// The SM4 S-box on each byte of a word (key schedule), without table lookups.
    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn tau(w: u32) -> u32 {
        let x = _mm_cvtsi32_si128(w as i32);
        let x = _mm_gf2p8affine_epi64_epi8::<PRE_CONST>(x, _mm_set1_epi64x(PRE_AFFINE));
        let x = _mm_gf2p8affineinv_epi64_epi8::<POST_CONST>(x, _mm_set1_epi64x(POST_AFFINE));
        _mm_cvtsi128_si32(x) as u32
    }

    /// The key schedule with the GFNI S-box, into `rk`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and GFNI.
    #[target_feature(enable = "avx2,gfni")]
    pub(super) unsafe fn round_keys(key: &[u8; 16], rk: &mut RoundKeys) {
        super::key_schedule(key, |w| tau(w), rk)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn xor(a: __m256i, b: __m256i) -> __m256i {
        _mm256_xor_si256(a, b)
    }

    /// Byte shuffle within each 128-bit lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn shuffle(a: __m256i, m: [u8; 16]) -> __m256i {
        let m = i128::from_le_bytes(m);
        let lane = _mm_set_epi64x((m >> 64) as i64, m as i64);
        _mm256_shuffle_epi8(a, _mm256_broadcastsi128_si256(lane))
    }

    const BSWAP32: [u8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];
    const ROL8: [u8; 16] = [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14];
    const ROL16: [u8; 16] = [2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13];
    const ROL24: [u8; 16] = [1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12];

    /// 4×4 transpose of dwords within each 128-bit lane (its own inverse).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose(r: [__m256i; 4]) -> [__m256i; 4] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
        ]
    }

    /// Load eight blocks (128 bytes) as a register set: register j holds word j (native
    /// endian) of each block.
    ///
    /// # Safety
    /// `p` must be valid for reads of 128 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const u8) -> [__m256i; 4] {
        let r: [__m256i; 4] = core::array::from_fn(|j| {
            // SAFETY: 32 j + 32 <= 128, in bounds per the contract; unaligned load.
            let v = unsafe { _mm256_loadu_si256(p.add(32 * j).cast()) };
            shuffle(v, BSWAP32)
        });
        transpose(r)
    }

    /// Store a register set holding (X32, X33, X34, X35) as the output blocks
    /// (X35, X34, X33, X32).
    ///
    /// # Safety
    /// `p` must be valid for writes of 128 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(p: *mut u8, x: &[__m256i; 4]) {
        let r = transpose([x[3], x[2], x[1], x[0]]);
        for (j, r) in r.iter().enumerate() {
            // SAFETY: 32 j + 32 <= 128, in bounds per the contract; unaligned store.
            unsafe { _mm256_storeu_si256(p.add(32 * j).cast(), shuffle(*r, BSWAP32)) };
        }
    }

    /// One round on every register set, AVX2: `X_j ^= L(S(X_{j+1} ^ X_{j+2} ^ X_{j+3} ^ rk))`
    /// with `L(t) = t ^ (t <<< 2) ^ (t <<< 10) ^ (t <<< 18) ^ (t <<< 24)`, computed as
    /// `t ^ (t <<< 24) ^ ((t ^ (t <<< 8) ^ (t <<< 16)) <<< 2)` (byte rotates are shuffles).
    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn round_avx2<const N: usize, const J: usize>(s: &mut [[__m256i; 4]; N], rk: u32) {
        let k = _mm256_set1_epi32(rk as i32);
        for x in s.iter_mut() {
            let t = sbox(xor(
                xor(x[(J + 1) % 4], x[(J + 2) % 4]),
                xor(x[(J + 3) % 4], k),
            ));
            let u = xor(xor(t, shuffle(t, ROL8)), shuffle(t, ROL16));
            let u = _mm256_or_si256(_mm256_slli_epi32::<2>(u), _mm256_srli_epi32::<30>(u));
            x[J] = xor(xor(x[J], xor(t, shuffle(t, ROL24))), u);
        }
    }

    /// The same round with AVX-512VL: `vprold` and `vpternlogd` (0x96: a ^ b ^ c).
    #[inline]
    #[target_feature(enable = "avx2,gfni,avx512f,avx512vl")]
    fn round_avx512vl<const N: usize, const J: usize>(s: &mut [[__m256i; 4]; N], rk: u32) {
        let k = _mm256_set1_epi32(rk as i32);
        for x in s.iter_mut() {
            let t =
                _mm256_ternarylogic_epi32::<0x96>(x[(J + 1) % 4], x[(J + 2) % 4], x[(J + 3) % 4]);
            let t = sbox(xor(t, k));
            let a = _mm256_ternarylogic_epi32::<0x96>(x[J], t, _mm256_rol_epi32::<2>(t));
            let b = _mm256_ternarylogic_epi32::<0x96>(
                _mm256_rol_epi32::<10>(t),
                _mm256_rol_epi32::<18>(t),
                _mm256_rol_epi32::<24>(t),
            );
            x[J] = xor(a, b);
        }
    }

    /// The first `K` of `SETS` pointers.
    #[inline]
    fn first<const K: usize>(p: &[*mut u8; SETS]) -> [*mut u8; K] {
        core::array::from_fn(|i| p[i])
    }

    /// The block functions for one level: the same code, compiled with that level's
    /// features, register type (a set is four of them: `$set` bytes, `$set / 16` blocks),
    /// loads, stores and round function.
    macro_rules! kernel {
        ($module:ident, $features:literal, $reg:ty, $set:literal, $load:path, $store:path, $($round:ident)::+) => {
            mod $module {
                use super::*;

                /// Bytes of one register set.
                const SET: usize = $set;
                /// Blocks in one pass of the main loop.
                #[allow(dead_code)]
                pub(super) const PASS: usize = SET / 16 * SETS;

                /// Encrypt (or, with reversed round keys, decrypt) `N` sets of blocks in
                /// place, one set at each pointer.
                ///
                /// # Safety
                /// The CPU must support the level's features; each pointer must be valid
                /// for reads and writes of `SET` bytes.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn blocks<const N: usize>(rk: &[u32; 32], p: [*mut u8; N]) {
                    // SAFETY: each pointer is valid for SET bytes (the contract).
                    let mut s: [[$reg; 4]; N] = core::array::from_fn(|i| unsafe { $load(p[i]) });
                    for q in rk.chunks_exact(4) {
                        $($round)::+::<N, 0>(&mut s, q[0]);
                        $($round)::+::<N, 1>(&mut s, q[1]);
                        $($round)::+::<N, 2>(&mut s, q[2]);
                        $($round)::+::<N, 3>(&mut s, q[3]);
                    }
                    for (x, &p) in s.iter().zip(&p) {
                        // SAFETY: as for the loads.
                        unsafe { $store(p, x) };
                    }
                }

                /// Run the cipher over `buf` (whole blocks): `SETS` sets at a time, then the
                /// remainder in one call, its last partial set through a zero-padded stack
                /// buffer.
                ///
                /// # Safety
                /// The CPU must support the level's features.
                #[target_feature(enable = $features)]
                pub(super) unsafe fn crypt(rk: &[u32; 32], buf: &mut [u8]) {
                    let mut groups = buf.chunks_exact_mut(SET * SETS);
                    for g in &mut groups {
                        let g = g.as_mut_ptr();
                        let p: [*mut u8; SETS] = core::array::from_fn(|i| g.wrapping_add(SET * i));
                        // SAFETY: the group has SET * SETS bytes, SET at each pointer;
                        // features per the contract.
                        unsafe { blocks::<SETS>(rk, p) };
                    }
                    let rest = groups.into_remainder();
                    if rest.is_empty() {
                        return;
                    }
                    let (full, tail) = rest.split_at_mut(rest.len() / SET * SET);
                    let mut pad = [0u8; SET];
                    pad[..tail.len()].copy_from_slice(tail);
                    let mut p = [pad.as_mut_ptr(); SETS];
                    let n = full.len() / SET;
                    let f = full.as_mut_ptr();
                    for (i, p) in p.iter_mut().take(n).enumerate() {
                        *p = f.wrapping_add(SET * i);
                    }
                    // Sets needed: the full ones (fewer than SETS), plus the pad if used.
                    let k = n + usize::from(!tail.is_empty());
                    // SAFETY: the first k pointers are the n whole sets of `full` and
                    // then `pad` (SET bytes), all distinct; features per the contract.
                    unsafe {
                        match k {
                            1 => blocks::<1>(rk, first(&p)),
                            2 => blocks::<2>(rk, first(&p)),
                            3 => blocks::<3>(rk, first(&p)),
                            4 => blocks::<4>(rk, first(&p)),
                            5 => blocks::<5>(rk, first(&p)),
                            6 => blocks::<6>(rk, first(&p)),
                            7 => blocks::<7>(rk, first(&p)),
                            8 => blocks::<8>(rk, first(&p)),
                            _ => unreachable!("at most SETS = 8 sets"),
                        }
                    }
                    tail.copy_from_slice(&pad[..tail.len()]);
                    pad.zeroize();
                }

                /// One block.
                ///
                /// # Safety
                /// The CPU must support the level's features.
                #[target_feature(enable = $features)]
                pub(super) unsafe fn crypt_one(rk: &[u32; 32], block: &mut [u8; 16]) {
                    let mut pad = [0u8; SET];
                    pad[..16].copy_from_slice(block);
                    // SAFETY: `pad` has SET bytes; features per the contract.
                    unsafe { blocks::<1>(rk, [pad.as_mut_ptr()]) };
                    block.copy_from_slice(&pad[..16]);
                    pad.zeroize();
                }
            }
        };
    }

    const _: () = assert!(SETS == 8, "`crypt` dispatches remainders of 1..=8 sets");

    kernel!(avx2, "avx2,gfni", __m256i, 128, load, store, round_avx2);
    kernel!(
        avx512vl,
        "avx2,gfni,avx512f,avx512vl",
        __m256i,
        128,
        load,
        store,
        round_avx512vl
    );
    kernel!(
        avx512,
        "avx512f,avx512bw,gfni",
        __m512i,
        256,
        zmm::load,
        zmm::store,
        zmm::round
    );

    /// The zmm kernel's pieces: the ymm kernel's layout (register j of a set holds word j of
    /// each block, after a transpose inside each 128-bit lane) with four lanes, so a set is
    /// sixteen blocks (256 bytes).
    mod zmm {
        use super::*;

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,gfni")]
        fn sbox(x: __m512i) -> __m512i {
            let x = _mm512_gf2p8affine_epi64_epi8::<PRE_CONST>(x, _mm512_set1_epi64(PRE_AFFINE));
            _mm512_gf2p8affineinv_epi64_epi8::<POST_CONST>(x, _mm512_set1_epi64(POST_AFFINE))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn bswap32(a: __m512i) -> __m512i {
            let m = i128::from_le_bytes(BSWAP32);
            let lane = _mm_set_epi64x((m >> 64) as i64, m as i64);
            _mm512_shuffle_epi8(a, _mm512_broadcast_i32x4(lane))
        }

        /// 4×4 transpose of dwords within each 128-bit lane (its own inverse).
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn transpose(r: [__m512i; 4]) -> [__m512i; 4] {
            let t0 = _mm512_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm512_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm512_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm512_unpackhi_epi32(r[2], r[3]);
            [
                _mm512_unpacklo_epi64(t0, t2),
                _mm512_unpackhi_epi64(t0, t2),
                _mm512_unpacklo_epi64(t1, t3),
                _mm512_unpackhi_epi64(t1, t3),
            ]
        }

        /// # Safety
        /// `p` must be valid for reads of 256 bytes.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) unsafe fn load(p: *const u8) -> [__m512i; 4] {
            let r: [__m512i; 4] = core::array::from_fn(|j| {
                // SAFETY: 64 j + 64 <= 256, in bounds per the contract; unaligned load.
                let v = unsafe { _mm512_loadu_si512(p.add(64 * j).cast()) };
                bswap32(v)
            });
            transpose(r)
        }

        /// # Safety
        /// `p` must be valid for writes of 256 bytes.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) unsafe fn store(p: *mut u8, x: &[__m512i; 4]) {
            let r = transpose([x[3], x[2], x[1], x[0]]);
            for (j, r) in r.iter().enumerate() {
                // SAFETY: 64 j + 64 <= 256, in bounds per the contract; unaligned store.
                unsafe { _mm512_storeu_si512(p.add(64 * j).cast(), bswap32(*r)) };
            }
        }

        /// One round on every set: `vprold` and `vpternlogd`, as `round_avx512vl`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,gfni")]
        pub(super) fn round<const N: usize, const J: usize>(s: &mut [[__m512i; 4]; N], rk: u32) {
            let k = _mm512_set1_epi32(rk as i32);
            for x in s.iter_mut() {
                let t = _mm512_ternarylogic_epi32::<0x96>(
                    x[(J + 1) % 4],
                    x[(J + 2) % 4],
                    x[(J + 3) % 4],
                );
                let t = sbox(_mm512_xor_si512(t, k));
                let a = _mm512_ternarylogic_epi32::<0x96>(x[J], t, _mm512_rol_epi32::<2>(t));
                let b = _mm512_ternarylogic_epi32::<0x96>(
                    _mm512_rol_epi32::<10>(t),
                    _mm512_rol_epi32::<18>(t),
                    _mm512_rol_epi32::<24>(t),
                );
                x[J] = _mm512_xor_si512(a, b);
            }
        }
    }

    /// Run the cipher over `buf` (whole blocks) with round keys `rk`.
    ///
    /// # Safety
    /// The CPU must support `level`.
    pub(super) unsafe fn crypt(level: Level, rk: &[u32; 32], buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(16));
        // SAFETY: the caller guarantees the level's features.
        unsafe {
            match level {
                Level::Avx2 => avx2::crypt(rk, buf),
                Level::Avx512Vl => avx512vl::crypt(rk, buf),
                // Fewer blocks than a pass: more, narrower sets hide the rounds' latency
                // better (a 512-byte sector is two zmm sets, or four ymm ones).
                Level::Avx512 if buf.len() < 16 * avx512::PASS => avx512vl::crypt(rk, buf),
                Level::Avx512 => avx512::crypt(rk, buf),
            }
        }
    }

    /// One block.
    ///
    /// # Safety
    /// The CPU must support `level`.
    pub(super) unsafe fn crypt_one(level: Level, rk: &[u32; 32], block: &mut [u8; 16]) {
        // SAFETY: the caller guarantees the level's features.
        unsafe {
            match level {
                Level::Avx2 => avx2::crypt_one(rk, block),
                Level::Avx512Vl => avx512vl::crypt_one(rk, block),
                Level::Avx512 => avx512::crypt_one(rk, block),
            }
        }
    }
    /// The kernel as a `cipher` backend. The round keys decide the direction:
    /// `encrypt_with_backend` hands out the encryption keys, `decrypt_with_backend` the
    /// reversed ones; only those two build one, for a level the CPU supports.
    pub(super) struct Backend<'a> {
        pub(super) rk: &'a [u32; 32],
        pub(super) level: Level,
    }

    impl Backend<'_> {
        #[inline]
        fn one(&self, block: InOut<'_, '_, Block>) {
            let b = block.into_out_with_copied_in();
            // SAFETY: a `Backend` only exists for a level the CPU supports (see above).
            unsafe { crypt_one(self.level, self.rk, &mut b.0) }
        }

        #[inline]
        fn many(&self, blocks: &mut [Block]) {
            // SAFETY: as in `one`.
            unsafe { crypt(self.level, self.rk, Block::slice_as_flattened_mut(blocks)) }
        }
    }

    impl BlockSizeUser for Backend<'_> {
        type BlockSize = U16;
    }

    impl ParBlocksSizeUser for Backend<'_> {
        /// `8 * SETS`: one pass of the kernel's main loop.
        type ParBlocksSize = U128;
    }

    const _: () = assert!(
        avx2::PASS * 2 == 128 && avx512::PASS == 128,
        "ParBlocksSize is one pass of the zmm kernel's main loop, two of the ymm kernel's"
    );

    impl BlockCipherEncBackend for Backend<'_> {
        #[inline]
        fn encrypt_block(&self, block: InOut<'_, '_, Block>) {
            self.one(block)
        }

        #[inline]
        fn encrypt_par_blocks(&self, blocks: InOut<'_, '_, ParBlocks<Self>>) {
            self.many(blocks.into_out_with_copied_in().as_mut_slice())
        }

        #[inline]
        fn encrypt_tail_blocks(&self, blocks: InOutBuf<'_, '_, Block>) {
            self.many(blocks.into_out_with_copied_in())
        }
    }

    impl BlockCipherDecBackend for Backend<'_> {
        #[inline]
        fn decrypt_block(&self, block: InOut<'_, '_, Block>) {
            self.one(block)
        }

        #[inline]
        fn decrypt_par_blocks(&self, blocks: InOut<'_, '_, ParBlocks<Self>>) {
            self.many(blocks.into_out_with_copied_in().as_mut_slice())
        }

        #[inline]
        fn decrypt_tail_blocks(&self, blocks: InOutBuf<'_, '_, Block>) {
            self.many(blocks.into_out_with_copied_in())
        }
    }

    /// Hand `f` the backend from a function compiled for AVX2 + GFNI, so that the caller's
    /// per-window code (the XTS tweaks and xors) is inlined with those features too.
    ///
    /// # Safety
    /// The CPU must support AVX2 and GFNI.
    #[target_feature(enable = "avx2,gfni")]
    pub(super) unsafe fn call_enc(f: impl BlockCipherEncClosure<BlockSize = U16>, b: &Backend) {
        if b.level == Level::Avx512 {
            // SAFETY: a backend of this level exists only where the CPU has it.
            return unsafe { call_enc_512(f, b) };
        }
        f.call(b)
    }

    /// [`call_enc`] compiled with AVX-512 too, for the zmm kernel's caller.
    #[target_feature(enable = "avx2,gfni,avx512f,avx512bw,avx512vl")]
    unsafe fn call_enc_512(f: impl BlockCipherEncClosure<BlockSize = U16>, b: &Backend) {
        f.call(b)
    }

    /// [`call_dec`] compiled with AVX-512 too.
    #[target_feature(enable = "avx2,gfni,avx512f,avx512bw,avx512vl")]
    unsafe fn call_dec_512(f: impl BlockCipherDecClosure<BlockSize = U16>, b: &Backend) {
        f.call(b)
    }

    /// The same for decryption.
    ///
    /// # Safety
    /// The CPU must support AVX2 and GFNI.
    #[target_feature(enable = "avx2,gfni")]
    pub(super) unsafe fn call_dec(f: impl BlockCipherDecClosure<BlockSize = U16>, b: &Backend) {
        if b.level == Level::Avx512 {
            // SAFETY: a backend of this level exists only where the CPU has it.
            return unsafe { call_dec_512(f, b) };
        }
        f.call(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GB/T 32907-2016 S-box.
    #[rustfmt::skip]
    const SBOX: [u8; 256] = [
        0xd6, 0x90, 0xe9, 0xfe, 0xcc, 0xe1, 0x3d, 0xb7, 0x16, 0xb6, 0x14, 0xc2, 0x28, 0xfb, 0x2c, 0x05,
        0x2b, 0x67, 0x9a, 0x76, 0x2a, 0xbe, 0x04, 0xc3, 0xaa, 0x44, 0x13, 0x26, 0x49, 0x86, 0x06, 0x99,
        0x9c, 0x42, 0x50, 0xf4, 0x91, 0xef, 0x98, 0x7a, 0x33, 0x54, 0x0b, 0x43, 0xed, 0xcf, 0xac, 0x62,
        0xe4, 0xb3, 0x1c, 0xa9, 0xc9, 0x08, 0xe8, 0x95, 0x80, 0xdf, 0x94, 0xfa, 0x75, 0x8f, 0x3f, 0xa6,
        0x47, 0x07, 0xa7, 0xfc, 0xf3, 0x73, 0x17, 0xba, 0x83, 0x59, 0x3c, 0x19, 0xe6, 0x85, 0x4f, 0xa8,
        0x68, 0x6b, 0x81, 0xb2, 0x71, 0x64, 0xda, 0x8b, 0xf8, 0xeb, 0x0f, 0x4b, 0x70, 0x56, 0x9d, 0x35,
        0x1e, 0x24, 0x0e, 0x5e, 0x63, 0x58, 0xd1, 0xa2, 0x25, 0x22, 0x7c, 0x3b, 0x01, 0x21, 0x78, 0x87,
        0xd4, 0x00, 0x46, 0x57, 0x9f, 0xd3, 0x27, 0x52, 0x4c, 0x36, 0x02, 0xe7, 0xa0, 0xc4, 0xc8, 0x9e,
        0xea, 0xbf, 0x8a, 0xd2, 0x40, 0xc7, 0x38, 0xb5, 0xa3, 0xf7, 0xf2, 0xce, 0xf9, 0x61, 0x15, 0xa1,
        0xe0, 0xae, 0x5d, 0xa4, 0x9b, 0x34, 0x1a, 0x55, 0xad, 0x93, 0x32, 0x30, 0xf5, 0x8c, 0xb1, 0xe3,
        0x1d, 0xf6, 0xe2, 0x2e, 0x82, 0x66, 0xca, 0x60, 0xc0, 0x29, 0x23, 0xab, 0x0d, 0x53, 0x4e, 0x6f,
        0xd5, 0xdb, 0x37, 0x45, 0xde, 0xfd, 0x8e, 0x2f, 0x03, 0xff, 0x6a, 0x72, 0x6d, 0x6c, 0x5b, 0x51,
        0x8d, 0x1b, 0xaf, 0x92, 0xbb, 0xdd, 0xbc, 0x7f, 0x11, 0xd9, 0x5c, 0x41, 0x1f, 0x10, 0x5a, 0xd8,
        0x0a, 0xc1, 0x31, 0x88, 0xa5, 0xcd, 0x7b, 0xbd, 0x2d, 0x74, 0xd0, 0x12, 0xb8, 0xe5, 0xb4, 0xb0,
        0x89, 0x69, 0x97, 0x4a, 0x0c, 0x96, 0x77, 0x7e, 0x65, 0xb9, 0xf1, 0x09, 0xc5, 0x6e, 0xc6, 0x84,
        0x18, 0xf0, 0x7d, 0xec, 0x3a, 0xdc, 0x4d, 0x20, 0x79, 0xee, 0x5f, 0x3e, 0xd7, 0xcb, 0x39, 0x48,
    ];

    // ---- GF(2^8) and 8×8 bit-matrix helpers (a matrix is 8 row masks; row i gives bit i).

    fn gmul(mut a: u8, mut b: u8, modulus: u16) -> u8 {
        let mut r = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                r ^= a;
            }
            b >>= 1;
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= (modulus & 0xff) as u8;
            }
        }
        r
    }

    fn ginv(a: u8, modulus: u16) -> u8 {
        (0..=255u8).find(|&b| gmul(a, b, modulus) == 1).unwrap_or(0)
    }

    fn parity(x: u8) -> u8 {
        (x.count_ones() & 1) as u8
    }

    fn apply(m: &[u8; 8], x: u8) -> u8 {
        (0..8).fold(0, |acc, i| acc | parity(m[i] & x) << i)
    }

    /// The matrix of a linear map, from its values on the basis vectors.
    fn matrix(f: impl Fn(u8) -> u8) -> [u8; 8] {
        let cols: Vec<u8> = (0..8).map(|j| f(1 << j)).collect();
        core::array::from_fn(|i| (0..8).fold(0, |acc, j| acc | ((cols[j] >> i) & 1) << j))
    }

    fn mul(a: &[u8; 8], b: &[u8; 8]) -> [u8; 8] {
        matrix(|x| apply(a, apply(b, x)))
    }

    fn inverse(a: &[u8; 8]) -> [u8; 8] {
        let mut table = [0u8; 256];
        for x in 0..=255u8 {
            table[apply(a, x) as usize] = x;
        }
        matrix(|y| table[y as usize])
    }

    /// A matrix in GFNI's qword encoding: byte 7 - i is the row giving output bit i.
    fn gfni_qword(m: &[u8; 8]) -> i64 {
        (0..8).fold(0u64, |acc, i| acc | (m[i] as u64) << (8 * (7 - i))) as i64
    }

    /// Software model of `gf2p8affineqb` (one byte).
    fn gf2p8affine(x: u8, a: i64, b: i32) -> u8 {
        let rows: [u8; 8] = core::array::from_fn(|i| (a as u64 >> (8 * (7 - i))) as u8);
        apply(&rows, x) ^ b as u8
    }

    /// Software model of `gf2p8affineinvqb` (inverse in the AES field, 0 ↦ 0).
    fn gf2p8affineinv(x: u8, a: i64, b: i32) -> u8 {
        gf2p8affine(ginv(x, 0x11b), a, b)
    }

    /// A table-based scalar SM4 over the table above, to tie the table to the `sm4` crate.
    fn reference_encrypt(key: &[u8; 16], block: &[u8; 16]) -> [u8; 16] {
        let tau = |w: u32| u32::from_be_bytes(w.to_be_bytes().map(|b| SBOX[b as usize]));
        let mut rk = RoundKeys::default();
        key_schedule(key, tau, &mut rk);
        let mut x: [u32; 4] = core::array::from_fn(|i| {
            u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap())
        });
        for (i, &k) in rk.enc.iter().enumerate() {
            let b = tau(x[(i + 1) % 4] ^ x[(i + 2) % 4] ^ x[(i + 3) % 4] ^ k);
            x[i % 4] ^=
                b ^ b.rotate_left(2) ^ b.rotate_left(10) ^ b.rotate_left(18) ^ b.rotate_left(24);
        }
        let mut out = [0u8; 16];
        for i in 0..4 {
            out[4 * i..4 * i + 4].copy_from_slice(&x[3 - i].to_be_bytes());
        }
        out
    }

    /// xorshift64*: reproducible test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for c in buf.chunks_mut(8) {
                let v = self.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
        fn key(&mut self) -> [u8; 16] {
            let mut k = [0u8; 16];
            self.fill(&mut k);
            k
        }
    }

    /// Every path this CPU can run: the GFNI kernel at each supported level, and the
    /// portable one.
    fn ciphers(key: &[u8; 16]) -> Vec<Sm4Fast> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![Sm4Fast::portable(key)];
        #[cfg(target_arch = "x86_64")]
        for level in [x86::Level::Avx512, x86::Level::Avx512Vl, x86::Level::Avx2] {
            if x86::supports(level) {
                v.push(Sm4Fast::with_level(key, level));
            } else {
                eprintln!("NOTE: this CPU cannot run {level:?}; not tested");
            }
        }
        v
    }

    fn unhex(s: &str) -> [u8; 16] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn sbox_table_is_the_sm4_crates() {
        let mut rng = Rng(0x5eed_0001);
        for _ in 0..64 {
            let key = rng.key();
            let block = rng.key();
            let mut theirs = block.into();
            sm4::Sm4::new(&key.into()).encrypt_block(&mut theirs);
            assert_eq!(reference_encrypt(&key, &block), <[u8; 16]>::from(theirs));
        }
        // The standard's first vector through the table-based reference, too.
        let k = unhex("0123456789abcdeffedcba9876543210");
        assert_eq!(
            reference_encrypt(&k, &k),
            unhex("681edf34d206965e86b3e94f536e4246")
        );
    }

    /// The S-box is `A·I(A·x + C) + C` in GF(2^8)/0x1f5, and the GFNI constants are
    /// `T·A`, `T·C`, `A·T⁻¹`, `C` for the isomorphism `T` sending x to the root 0xd6 of
    /// 0x1f5 in the AES field.
    #[test]
    fn gfni_constants_derive_from_the_sbox_structure() {
        let a: [u8; 8] = core::array::from_fn(|i| 0xa7u8.rotate_left(i as u32));
        let c = 0xd3u8;
        for x in 0..=255u8 {
            let y = apply(&a, ginv(apply(&a, x) ^ c, 0x1f5)) ^ c;
            assert_eq!(y, SBOX[x as usize], "structure at {x:#04x}");
        }
        // Roots of x^8+x^7+x^6+x^5+x^4+x^2+1 in GF(2^8)/0x11b.
        let eval = |b: u8| {
            (0..=8).rev().fold(0u8, |acc, k| {
                gmul(acc, b, 0x11b) ^ ((0x1f5u16 >> k) & 1) as u8
            })
        };
        let roots: Vec<u8> = (0..=255u8).filter(|&b| eval(b) == 0).collect();
        assert_eq!(roots.len(), 8);
        assert!(roots.contains(&0xd6));
        // T maps the SM4 field's basis x^j to 0xd6^j.
        let mut powers = [1u8; 8];
        for j in 1..8 {
            powers[j] = gmul(powers[j - 1], 0xd6, 0x11b);
        }
        let t = matrix(|e| powers[e.trailing_zeros() as usize]);
        // T is a field isomorphism.
        for x in 0..=255u8 {
            for y in [0x02u8, 0x53, 0xd6, 0xff] {
                assert_eq!(
                    apply(&t, gmul(x, y, 0x1f5)),
                    gmul(apply(&t, x), apply(&t, y), 0x11b)
                );
            }
        }
        assert_eq!(gfni_qword(&mul(&t, &a)), PRE_AFFINE);
        assert_eq!(apply(&t, c) as i32, PRE_CONST);
        assert_eq!(gfni_qword(&mul(&a, &inverse(&t))), POST_AFFINE);
        assert_eq!(c as i32, POST_CONST);
    }

    /// The constants as used, modelled in software: all 256 S-box values.
    #[test]
    fn gfni_constants_reproduce_the_sbox() {
        for x in 0..=255u8 {
            let y = gf2p8affineinv(
                gf2p8affine(x, PRE_AFFINE, PRE_CONST),
                POST_AFFINE,
                POST_CONST,
            );
            assert_eq!(y, SBOX[x as usize], "S({x:#04x})");
        }
    }

    /// The kernel's S-box on the CPU: all 256 S-box values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hardware_sbox_is_the_sbox() {
        use core::arch::x86_64::*;
        if x86::detect().is_none() {
            eprintln!("SKIPPED: no GFNI/AVX2");
            return;
        }
        let input: [u8; 256] = core::array::from_fn(|i| i as u8);
        let mut out = [0u8; 256];
        for (i, o) in input.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            // SAFETY: the features were detected above; 32-byte unaligned loads and stores
            // inside 32-byte chunks.
            unsafe {
                let v = x86::sbox(_mm256_loadu_si256(i.as_ptr().cast()));
                _mm256_storeu_si256(o.as_mut_ptr().cast(), v);
            }
        }
        assert_eq!(out, SBOX);
    }

    #[test]
    fn gbt32907_vectors() {
        let k = unhex("0123456789abcdeffedcba9876543210");
        let expect1 = unhex("681edf34d206965e86b3e94f536e4246");
        let expect_million = unhex("595298c7c6fd271f0402f804c33d3f66");
        for c in ciphers(&k) {
            let mut b = k;
            c.encrypt_block(&mut b);
            assert_eq!(b, expect1, "{}", c.backend());
            c.decrypt_block(&mut b);
            assert_eq!(b, k);
            let mut blocks = [k; 3].concat();
            c.encrypt_blocks(&mut blocks);
            assert_eq!(blocks, [expect1; 3].concat());
            c.decrypt_blocks(&mut blocks);
            assert_eq!(blocks, [k; 3].concat());

            let mut b = k;
            for _ in 0..1_000_000 {
                c.encrypt_block(&mut b);
            }
            assert_eq!(b, expect_million, "{}", c.backend());
        }
    }

    fn check_against_crate(key: &[u8; 16], plain: &[u8]) {
        let theirs = sm4::Sm4::new(key.into());
        let mut expect = plain.to_vec();
        theirs.encrypt_blocks(as_blocks(&mut expect));
        for c in ciphers(key) {
            let mut buf = plain.to_vec();
            c.encrypt_blocks(&mut buf);
            assert!(
                buf == expect,
                "encrypt: {} blocks, {}",
                plain.len() / 16,
                c.backend()
            );
            c.decrypt_blocks(&mut buf);
            assert!(
                buf == plain,
                "decrypt: {} blocks, {}",
                plain.len() / 16,
                c.backend()
            );
            // Decryption against the crate's, too (not just the round trip).
            let mut buf = plain.to_vec();
            let mut expect_dec = plain.to_vec();
            theirs.decrypt_blocks(as_blocks(&mut expect_dec));
            c.decrypt_blocks(&mut buf);
            assert!(
                buf == expect_dec,
                "decrypt vs crate: {} blocks",
                plain.len() / 16
            );
        }
    }

    #[test]
    fn agrees_with_sm4_crate_every_length() {
        let mut rng = Rng(0x5eed_0002);
        // Every block count from 1 to 300 (16 B .. 4800 B), a fresh key for each.
        for n in 1..=300 {
            let key = rng.key();
            let mut plain = vec![0u8; 16 * n];
            rng.fill(&mut plain);
            check_against_crate(&key, &plain);
        }
    }

    #[test]
    fn agrees_with_sm4_crate_one_mib() {
        let mut rng = Rng(0x5eed_0003);
        for _ in 0..2 {
            let key = rng.key();
            let mut plain = vec![0u8; 1 << 20];
            rng.fill(&mut plain);
            check_against_crate(&key, &plain);
        }
        // And an odd-sized large one: 16 + 8 + 5 blocks past a round number.
        let key = rng.key();
        let mut plain = vec![0u8; (1 << 20) + 29 * 16];
        rng.fill(&mut plain);
        check_against_crate(&key, &plain);
    }

    #[test]
    fn single_blocks_agree_with_sm4_crate() {
        let mut rng = Rng(0x5eed_0004);
        for _ in 0..200 {
            let key = rng.key();
            let block = rng.key();
            let mut expect = block.into();
            sm4::Sm4::new(&key.into()).encrypt_block(&mut expect);
            for c in ciphers(&key) {
                let mut b = block;
                c.encrypt_block(&mut b);
                assert_eq!(b, <[u8; 16]>::from(expect));
                c.decrypt_block(&mut b);
                assert_eq!(b, block);
            }
        }
    }

    #[test]
    fn gfni_key_schedule_matches_table_one() {
        // The GFNI key schedule against the same schedule on the table S-box (which the
        // vectors and the crate comparison tie to the standard).
        let mut rng = Rng(0x5eed_0005);
        for _ in 0..100 {
            let key = rng.key();
            let mut table = RoundKeys::default();
            key_schedule(
                &key,
                |w| u32::from_be_bytes(w.to_be_bytes().map(|b| SBOX[b as usize])),
                &mut table,
            );
            let mut reversed = table.enc;
            reversed.reverse();
            assert_eq!(table.dec, reversed);
            match &Sm4Fast::new(&key).inner {
                #[cfg(target_arch = "x86_64")]
                Inner::Gfni(rk, _) => {
                    assert_eq!(rk.enc, table.enc);
                    assert_eq!(rk.dec, table.dec);
                }
                Inner::Portable(_) => eprintln!("NOTE: no GFNI/AVX2; GFNI key schedule not run"),
            }
        }
    }

    /// The `cipher` trait impls (what generic code such as the XTS layer uses): in place
    /// and buffer to buffer, whole 64-block windows and tails, against the `sm4` crate.
    #[test]
    fn cipher_traits_agree_with_sm4_crate() {
        let mut rng = Rng(0x5eed_0006);
        for n in [0usize, 1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 200, 1000] {
            let key = rng.key();
            let theirs = sm4::Sm4::new(&key.into());
            let mut plain = vec![Block::default(); n];
            for b in plain.iter_mut() {
                rng.fill(&mut b.0);
            }
            let mut expect = plain.clone();
            theirs.encrypt_blocks(&mut expect);
            for c in ciphers(&key) {
                let what = c.backend();
                let mut b = plain.clone();
                BlockCipherEncrypt::encrypt_blocks(&c, &mut b);
                assert!(b == expect, "{what}: {n} blocks in place");
                BlockCipherDecrypt::decrypt_blocks(&c, &mut b);
                assert!(b == plain, "{what}: {n} blocks in place, decrypt");

                let mut out = vec![Block::default(); n];
                c.encrypt_blocks_b2b(&plain, &mut out).unwrap();
                assert!(out == expect, "{what}: {n} blocks b2b");
                let mut back = vec![Block::default(); n];
                c.decrypt_blocks_b2b(&out, &mut back).unwrap();
                assert!(back == plain, "{what}: {n} blocks b2b, decrypt");
                // Inputs untouched by buffer-to-buffer calls.
                assert!(out == expect);

                if n > 0 {
                    let mut one = Block::default();
                    c.encrypt_block_b2b(&plain[0], &mut one);
                    assert_eq!(one, expect[0], "{what}: one block b2b");
                    BlockCipherDecrypt::decrypt_block(&c, &mut one);
                    assert_eq!(one, plain[0], "{what}: one block, decrypt");
                }
            }
        }
        assert!(<Sm4Fast as KeyInit>::new_from_slice(&[0; 15]).is_err());
        let k = unhex("0123456789abcdeffedcba9876543210");
        let c = <Sm4Fast as KeyInit>::new_from_slice(&k).unwrap();
        assert_eq!(c.backend(), Sm4Fast::new(&k).backend());
        let mut b = Block::from(k);
        BlockCipherEncrypt::encrypt_block(&c, &mut b);
        assert_eq!(b.0, unhex("681edf34d206965e86b3e94f536e4246"));
    }

    #[test]
    fn detection_matches_cpu() {
        let c = Sm4Fast::new(&[7; 16]);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(c.accelerated(), x86::detect().is_some());
        #[cfg(not(target_arch = "x86_64"))]
        assert!(!c.accelerated());
        assert!(!Sm4Fast::portable(&[7; 16]).accelerated());
    }

    #[test]
    fn empty_buffer_is_a_no_op() {
        for c in ciphers(&[9; 16]) {
            c.encrypt_blocks(&mut []);
            c.decrypt_blocks(&mut []);
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn f<T: Send + Sync>() {}
        f::<Sm4Fast>();
    }
}
