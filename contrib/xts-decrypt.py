#!/usr/bin/env python3
"""Decrypt an encimg payload without encimg: OpenSSL (through Python's `cryptography`),
sector by sector, streaming (memory use is one sector, whatever the disk's size).

    encimg info RES --json        # "file", "data_offset", "sector_size", "size", "cipher"
    encimg dek RES --reveal > key.hex
    python3 contrib/xts-decrypt.py FILE key.hex DATA_OFFSET SECTOR_SIZE SIZE CIPHER > plain.raw

CIPHER is aes-xts-plain64 (OpenSSL's AES-256-XTS) or sm4-xts-plain64 (IEEE 1619 XTS
built here on OpenSSL's SM4 block cipher: OpenSSL before 3.2 has no SM4-XTS). Sector n is
encrypted with tweak n as a 16-byte little-endian number; a sector whose ciphertext is all
zeros was never written and reads as zeros.
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def xts_sm4(key, tweak, data):
    """IEEE 1619 XTS over SM4, decrypting: T = E_K2(tweak); P_j = D_K1(C_j ^ T) ^ T; T *= alpha."""
    k1, k2 = key[:16], key[16:]
    t = int.from_bytes(Cipher(algorithms.SM4(k2), modes.ECB()).encryptor().update(tweak), "little")
    dec = Cipher(algorithms.SM4(k1), modes.ECB()).decryptor()
    out = bytearray()
    for j in range(0, len(data), 16):
        tb = t.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[j:j + 16], tb))
        out += bytes(a ^ b for a, b in zip(dec.update(block), tb))
        t = ((t << 1) ^ (0x87 if t >> 127 else 0)) & ((1 << 128) - 1)
    return bytes(out)


def main():
    path, keyfile, off, ss, size, cipher = sys.argv[1:7]
    key = bytes.fromhex(open(keyfile).read().strip())
    off, ss, size = int(off), int(ss), int(size)
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        f.seek(off)
        n, left = 0, size
        while left > 0:
            ct = f.read(ss)
            if len(ct) < ss:
                sys.exit(f"{path}: sector {n} is missing (the file is truncated)")
            tweak = n.to_bytes(16, "little")
            if ct == bytes(ss):
                pt = ct
            elif cipher == "aes-xts-plain64":
                d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
                pt = d.update(ct) + d.finalize()
            elif cipher == "sm4-xts-plain64":
                pt = xts_sm4(key, tweak, ct)
            else:
                sys.exit(f"unknown cipher {cipher}")
            out.write(pt[:min(ss, left)])
            left -= ss
            n += 1


if __name__ == "__main__":
    main()
