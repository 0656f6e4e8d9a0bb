//! Attention K/V in fixed-size blocks. A sequence's K/V in one attention layer is a list of
//! blocks of [`BLOCK`] positions; blocks are shared by reference count (`Arc`) between
//! sequences, snapshots and the prefix cache, so that sharing a prefix never copies it. A
//! block is written only through [`Arc::make_mut`]: a writer that shares its last block
//! (a sequence resumed from a snapshot that ends inside it) gets its own copy first, so
//! rows another holder reads never change.
//!
//! Blocks are as long as the attention kernels' chunks, so each chunk reads one block's
//! contiguous rows, and they never move once written: a sequence grows by adding blocks.

use std::sync::Arc;

use crate::kernels::attention::{Kv, Rows, CHUNK};

/// Positions per block.
pub const BLOCK: usize = CHUNK;

/// How attention layers store their keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    /// Rounded to nearest even.
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

/// Key or value rows of one block, `BLOCK × width` values, allocated whole.
#[derive(Clone)]
pub enum KvRows {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl KvRows {
    fn new(dtype: KvDtype, n: usize) -> KvRows {
        match dtype {
            KvDtype::F32 => KvRows::F32(vec![0.0; n]),
            KvDtype::Bf16 => KvRows::Bf16(vec![0; n]),
        }
    }

    fn set(&mut self, at: usize, row: &[f32]) {
        match self {
            KvRows::F32(d) => d[at..at + row.len()].copy_from_slice(row),
            KvRows::Bf16(d) => {
                for (o, &x) in d[at..at + row.len()].iter_mut().zip(row) {
                    *o = half::bf16::from_f32(x).to_bits();
                }
            }
        }
    }

    /// The bits of the first `n` values.
    fn hash_prefix(&self, n: usize, h: &mut impl std::hash::Hasher) {
        match self {
            KvRows::F32(d) => d[..n].iter().for_each(|x| h.write_u32(x.to_bits())),
            KvRows::Bf16(d) => d[..n].iter().for_each(|&x| h.write_u16(x)),
        }
    }

    fn view(&self) -> Rows<'_> {
        match self {
            KvRows::F32(d) => Rows::F32(d),
            KvRows::Bf16(d) => Rows::Bf16(d),
        }
    }
}

/// Keys and values of [`BLOCK`] positions of one attention layer.
#[derive(Clone)]
pub struct KvBlock {
    k: KvRows,
    v: KvRows,
}

impl KvBlock {
    fn new(dtype: KvDtype, width: usize) -> KvBlock {
        KvBlock {
            k: KvRows::new(dtype, BLOCK * width),
            v: KvRows::new(dtype, BLOCK * width),
        }
    }

    /// Bytes this block holds.
    pub fn bytes_held(&self) -> usize {
        let n = |r: &KvRows| match r {
            KvRows::F32(d) => 4 * d.len(),
            KvRows::Bf16(d) => 2 * d.len(),
        };
        n(&self.k) + n(&self.v)
    }

    /// Bytes of one block of `width`-wide rows.
    pub fn bytes(dtype: KvDtype, width: usize) -> usize {
        2 * BLOCK * width * dtype.bytes()
    }
}

/// One attention layer's K/V of a sequence: `len` rows of `heads × hd` values in blocks.
#[derive(Clone)]
pub struct PagedKv {
    dtype: KvDtype,
    heads: usize,
    hd: usize,
    len: usize,
    blocks: Vec<Arc<KvBlock>>,
}

impl PagedKv {
    pub fn new(dtype: KvDtype, heads: usize, hd: usize) -> PagedKv {
        PagedKv {
            dtype,
            heads,
            hd,
            len: 0,
            blocks: Vec::new(),
        }
    }

    fn width(&self) -> usize {
        self.heads * self.hd
    }

    /// Feeds the bits of the rows held to `h` (tests compare states with it).
    pub fn hash_rows(&self, h: &mut impl std::hash::Hasher) {
        h.write_usize(self.len);
        let w = self.width();
        for (i, b) in self.blocks.iter().enumerate() {
            let rows = (self.len - i * BLOCK).min(BLOCK);
            b.k.hash_prefix(rows * w, h);
            b.v.hash_prefix(rows * w, h);
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Appends one position's key and value rows.
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        let w = self.width();
        assert!(k.len() == w && v.len() == w, "K/V row of the wrong width");
        let (b, r) = (self.len / BLOCK, self.len % BLOCK);
        if b == self.blocks.len() {
            self.blocks.push(Arc::new(KvBlock::new(self.dtype, w)));
        }
        let block = Arc::make_mut(&mut self.blocks[b]);
        block.k.set(r * w, k);
        block.v.set(r * w, v);
        self.len += 1;
    }

    /// Keeps the first `n` rows (`n ≤ len`); blocks past them are let go.
    pub fn truncate(&mut self, n: usize) {
        assert!(n <= self.len, "truncating K/V of {} rows to {n}", self.len);
        self.blocks.truncate(n.div_ceil(BLOCK));
        self.len = n;
    }

    /// The blocks, each as the attention kernels read it (whole blocks: a token reads only
    /// the rows before its own position).
    pub fn views(&self) -> Vec<Kv<'_>> {
        self.blocks
            .iter()
            .map(|b| Kv {
                k: b.k.view(),
                v: b.v.view(),
                heads: self.heads,
                hd: self.hd,
                len: BLOCK,
            })
            .collect()
    }

    /// The blocks, for sharing (a snapshot, the prefix cache).
    pub fn blocks(&self) -> &[Arc<KvBlock>] {
        &self.blocks
    }

    /// Replaces the rows by the first `len` of `blocks` (shared, not copied).
    pub fn share(&mut self, blocks: &[Arc<KvBlock>], len: usize) {
        assert!(
            len <= blocks.len() * BLOCK,
            "{len} rows in {} blocks",
            blocks.len()
        );
        self.blocks.clear();
        self.blocks
            .extend_from_slice(&blocks[..len.div_ceil(BLOCK)]);
        self.len = len;
    }

    /// Bytes of the blocks in use (whole blocks, shared ones too).
    pub fn bytes(&self) -> usize {
        self.blocks.len() * KvBlock::bytes(self.dtype, self.width())
    }

    /// Bytes of one position's key and value rows.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.width() * self.dtype.bytes()
    }

    /// Bytes of the rows held, what decode reads per token.
    pub fn row_bytes(&self) -> usize {
        2 * self.len * self.width() * self.dtype.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(w: usize, seed: usize) -> Vec<f32> {
        (0..w).map(|i| (seed * 31 + i) as f32).collect()
    }

    fn k_at(kv: &PagedKv, pos: usize) -> Vec<f32> {
        let views = kv.views();
        let b = views[pos / BLOCK];
        let w = kv.width();
        let at = (pos % BLOCK) * w;
        match b.k {
            Rows::F32(d) => d[at..at + w].to_vec(),
            Rows::Bf16(_) => unreachable!(),
        }
    }

    #[test]
    fn rows_land_in_blocks_and_sharing_copies_on_write_only() {
        let w = 4;
        let mut a = PagedKv::new(KvDtype::F32, 2, 2);
        for p in 0..BLOCK + 10 {
            a.push(&row(w, p), &row(w, p + 1000));
        }
        assert_eq!((a.len(), a.blocks().len()), (BLOCK + 10, 2));
        assert_eq!(k_at(&a, BLOCK + 3), row(w, BLOCK + 3));

        // b resumes from a's first BLOCK + 5 rows: both blocks shared, none copied.
        let mut b = PagedKv::new(KvDtype::F32, 2, 2);
        b.share(a.blocks(), BLOCK + 5);
        assert!(Arc::ptr_eq(&a.blocks()[0], &b.blocks()[0]));
        assert!(Arc::ptr_eq(&a.blocks()[1], &b.blocks()[1]));
        // b's first write goes into its own copy of the shared last block; a keeps its rows.
        b.push(&row(w, 7777), &row(w, 7777));
        assert!(Arc::ptr_eq(&a.blocks()[0], &b.blocks()[0]));
        assert!(!Arc::ptr_eq(&a.blocks()[1], &b.blocks()[1]));
        assert_eq!(k_at(&b, BLOCK + 5), row(w, 7777));
        assert_eq!(k_at(&a, BLOCK + 5), row(w, BLOCK + 5));
        assert_eq!(k_at(&b, BLOCK + 4), row(w, BLOCK + 4));

        // Truncation lets go of whole blocks only.
        a.truncate(BLOCK);
        assert_eq!((a.len(), a.blocks().len()), (BLOCK, 1));
        a.push(&row(w, 1), &row(w, 1));
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(Arc::strong_count(&b.blocks()[0]), 2);
    }

    #[test]
    fn bfloat16_rows_round_to_nearest_even() {
        let mut a = PagedKv::new(KvDtype::Bf16, 1, 2);
        a.push(&[1.0 + 2f32.powi(-9), -3.0], &[0.5, 0.25]);
        let Rows::Bf16(k) = a.views()[0].k else {
            unreachable!()
        };
        assert_eq!(&k[..2], &[0x3F80, 0xC040]);
        assert_eq!(a.bytes(), 2 * BLOCK * 2 * 2);
        assert_eq!(a.row_bytes(), 2 * 2 * 2);
    }
}
