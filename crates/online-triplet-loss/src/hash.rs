//! The hash of the crate's maps: of int64 label keys to their columns, and
//! of embedding rows to their first copy.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A multiplicative hash, 8 bytes at a time: labels and embeddings are not
/// chosen by an adversary who could make a map slow, and SipHash over every
/// byte would cost more than the lookups it serves.
#[derive(Default)]
pub(crate) struct MulHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = bytes.as_chunks::<8>();
        for w in words {
            self.write_u64(u64::from_le_bytes(*w));
        }
        for &b in rest {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(K);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(K);
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
}

/// A `HashMap` with [`MulHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MulHasher>>;
