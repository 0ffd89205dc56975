//! Fuzz the v1 header codec.
//!
//! * `Header::decode` on the raw input (any length) must never panic.
//! * The same bytes with the magic, the version and the CRC patched in ("fixed up") are
//!   decoded too, so the fuzzer gets past the checksum and exercises the field validation.
//! * Whatever decodes must round-trip: `decode(encode(h)) == h`, and encoding is stable.
//! * `read_header` on a file holding the raw input, and on a file holding two fixed-up
//!   copies, must never panic and must agree with what `decode` says about each copy.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use encimg::format::{read_header, Header, HEADER_COPY_LEN, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

const CRC_AT: usize = HEADER_COPY_LEN - 4;

/// One header copy with the magic, version and CRC patched in over `chunk` (zero padded).
fn fixup(chunk: &[u8]) -> [u8; HEADER_COPY_LEN] {
    let mut b = [0u8; HEADER_COPY_LEN];
    let n = chunk.len().min(HEADER_COPY_LEN);
    b[..n].copy_from_slice(&chunk[..n]);
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// CRC-32/ISO-HDLC (the zlib CRC), bitwise; the fuzz crate keeps to two dependencies.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &x in data {
        c = t[((c ^ u32::from(x)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Decode, and if that worked, check the round trip. Returns the decoded header.
fn decode_checked(b: &[u8]) -> Option<Header> {
    let h = Header::decode(b).ok()?;
    let enc = h.encode();
    let again = Header::decode(&enc)
        .unwrap_or_else(|e| panic!("re-decoding an encoded header failed: {e:?}\nheader: {h:?}"));
    assert_eq!(again, h, "header did not round-trip through encode/decode");
    assert!(again.encode() == enc, "encoding is not stable");
    // The decoded header's own accessors must not panic either.
    let _ = h.sectors();
    let _ = h.uuid_string();
    Some(h)
}

/// A scratch file reused across runs (a fresh file per run would dominate the time).
fn scratch() -> &'static File {
    static F: OnceLock<File> = OnceLock::new();
    F.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("encimg-fuzz-header-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("creating the scratch file");
        // Unlinked at once: the open handle keeps it alive, nothing is left behind.
        let _ = std::fs::remove_file(&path);
        f
    })
}

fn read_header_of(bytes: &[u8]) -> encimg::Result<(Header, bool)> {
    let f = scratch();
    f.set_len(0).expect("truncating the scratch file");
    f.write_all_at(bytes, 0).expect("writing the scratch file");
    read_header(f)
}

/// What `read_header` must answer for a file whose two copies decode to `a` and `b`.
fn check_read_header(bytes: &[u8], a: Option<Header>, b: Option<Header>) {
    let got = read_header_of(bytes);
    match (a, b, got) {
        (Some(a), Some(b), Ok((h, damaged))) => {
            assert!(!damaged, "two good copies reported as damaged");
            let want = if b.seq > a.seq { b } else { a };
            assert_eq!(h, want, "read_header did not pick the newest copy");
        }
        (Some(x), None, Ok((h, damaged))) | (None, Some(x), Ok((h, damaged))) => {
            assert!(damaged, "one bad copy not reported");
            assert_eq!(h, x, "read_header did not pick the good copy");
        }
        (None, None, Err(_)) => {}
        (a, b, got) => panic!(
            "read_header disagrees with decode: copy A ok={} copy B ok={} read_header={:?}",
            a.is_some(),
            b.is_some(),
            got.map(|(h, d)| (h.seq, d))
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The raw bytes, any length.
    let _ = decode_checked(data);

    // 2. Fixed-up copies: A from the first 4096 bytes, B from the next 4096.
    let fa = fixup(data);
    let a = decode_checked(&fa);
    let fb = fixup(data.get(HEADER_COPY_LEN..).unwrap_or(&[]));
    let b = decode_checked(&fb);

    // 3. read_header on the raw input (only meaningful if it holds two copies) ...
    if data.len() >= 2 * HEADER_COPY_LEN {
        let ra = decode_checked(&data[..HEADER_COPY_LEN]);
        let rb = decode_checked(&data[HEADER_COPY_LEN..2 * HEADER_COPY_LEN]);
        check_read_header(data, ra, rb);
    } else {
        assert!(
            read_header_of(data).is_err(),
            "read_header accepted a file shorter than two copies"
        );
    }
    // ... and on the two fixed-up copies.
    let mut two = Vec::with_capacity(2 * HEADER_COPY_LEN);
    two.extend_from_slice(&fa);
    two.extend_from_slice(&fb);
    check_read_header(&two, a, b);
});
