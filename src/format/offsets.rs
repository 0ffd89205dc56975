//! Pure offset math: which sectors a plaintext byte range touches, and where.

/// The sectors a byte range `[offset, offset + len)` touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorSpan {
    /// First sector touched.
    pub first: u64,
    /// Number of sectors touched.
    pub count: u64,
    /// Offset of the range's first byte inside the first sector.
    pub head: usize,
}

/// The sectors touched by `len` bytes at `offset` with sectors of `sector_size` bytes.
/// An empty range touches no sector.
pub fn sector_span(offset: u64, len: u64, sector_size: u32) -> SectorSpan {
    let ss = u64::from(sector_size);
    if len == 0 {
        return SectorSpan {
            first: offset / ss,
            count: 0,
            head: (offset % ss) as usize,
        };
    }
    let first = offset / ss;
    let last = (offset + len - 1) / ss;
    SectorSpan {
        first,
        count: last - first + 1,
        head: (offset % ss) as usize,
    }
}

/// Round `n` up to a multiple of `align` (a power of two or any positive number).
pub fn round_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(
            sector_span(0, 512, 512),
            SectorSpan {
                first: 0,
                count: 1,
                head: 0
            }
        );
        assert_eq!(
            sector_span(511, 2, 512),
            SectorSpan {
                first: 0,
                count: 2,
                head: 511
            }
        );
        assert_eq!(sector_span(4096, 4096, 4096).count, 1);
        assert_eq!(sector_span(4095, 0, 4096).count, 0);
        assert_eq!(round_up(1, 512), 512);
        assert_eq!(round_up(1024, 512), 1024);
    }
}
