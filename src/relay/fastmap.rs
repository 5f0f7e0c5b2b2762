//! Hash maps keyed by the relay's own u64s (sequence numbers, aggregate keys that
//! are already hashes): one multiply instead of SipHash on the hot path.

use std::collections::HashMap;

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<U64Hasher>>;

#[derive(Default, Clone, Copy)]
pub struct U64Hasher(u64);

impl std::hash::Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Folded multiply: every input bit reaches the high bits hashbrown uses.
        let m = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15u128;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_spread_over_the_hash_table() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        // hashbrown picks the bucket from the low bits and a tag from the top 7 bits:
        // a window of consecutive sequence numbers must use both well.
        let build = BuildHasherDefault::<U64Hasher>::default();
        let hashes: Vec<u64> = (1_000_000u64..1_002_048)
            .map(|s| build.hash_one(s))
            .collect();
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 2047).collect();
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            buckets.len() > 1200,
            "{} of 2048 buckets used",
            buckets.len()
        );
        assert_eq!(tags.len(), 128, "every 7-bit tag is used");
    }
}
