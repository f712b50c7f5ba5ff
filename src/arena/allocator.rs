//! An offset allocator for one contiguous range: first fit over a sorted
//! free list, with coalescing on release. Pure logic, tested without a GPU.
//!
//! Every free and live range lies inside `[0, size)`, so `start + len` of one
//! of them never overflows (even for `size == u64::MAX`); sums of a request
//! and an offset are checked.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct OffsetAllocator {
    size: u64,
    /// Free ranges, start -> length; never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    /// Live allocations, start -> length.
    used: BTreeMap<u64, u64>,
}

impl OffsetAllocator {
    pub fn new(size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        OffsetAllocator { size, free, used: BTreeMap::new() }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.values().sum()
    }

    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Allocates `bytes` at an offset that is a multiple of `align` (a power of two).
    pub fn alloc(&mut self, bytes: u64, align: u64) -> Result<u64> {
        if bytes == 0 {
            return Err(Error::invalid("cannot allocate zero bytes"));
        }
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::invalid(format!("alignment {align} is not a power of two")));
        }
        let found = self.free.iter().find_map(|(&start, &len)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            let end = at.checked_add(bytes)?;
            (end <= start + len).then_some((start, len, at, end))
        });
        let Some((start, len, at, end)) = found else {
            return Err(Error::ArenaFull(format!(
                "{bytes} bytes requested, largest free piece is {} of {} bytes",
                self.largest_free(),
                self.size
            )));
        };
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if start + len > end {
            self.free.insert(end, start + len - end);
        }
        self.used.insert(at, bytes);
        Ok(at)
    }

    /// Size of the live allocation at `offset`.
    pub fn allocation(&self, offset: u64) -> Option<u64> {
        self.used.get(&offset).copied()
    }

    /// True if `[offset, offset+bytes)` lies inside one live allocation.
    pub fn contains(&self, offset: u64, bytes: u64) -> bool {
        self.used
            .range(..=offset)
            .next_back()
            .is_some_and(|(&s, &l)| offset.checked_add(bytes).is_some_and(|e| e <= s + l))
    }

    /// Releases the allocation that starts at `offset`.
    pub fn release(&mut self, offset: u64) -> Result<u64> {
        let bytes = self
            .used
            .remove(&offset)
            .ok_or_else(|| Error::invalid(format!("no allocation starts at offset {offset}")))?;
        let (mut start, mut len) = (offset, bytes);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_coalesces_back_to_one_piece() {
        let mut a = OffsetAllocator::new(1 << 20);
        let x = a.alloc(1000, 256).unwrap();
        let y = a.alloc(5000, 256).unwrap();
        let z = a.alloc(300, 4096).unwrap();
        assert_eq!(x, 0);
        assert_eq!(y % 256, 0);
        assert!(y >= 1000);
        assert_eq!(z % 4096, 0);
        assert!(z >= y + 5000);
        assert_eq!(a.used_bytes(), 6300);
        a.release(y).unwrap();
        a.release(x).unwrap();
        a.release(z).unwrap();
        assert_eq!(a.largest_free(), 1 << 20);
        assert_eq!(a.free.len(), 1);
    }

    #[test]
    fn full_and_bad_requests_are_errors() {
        let mut a = OffsetAllocator::new(4096);
        assert!(matches!(a.alloc(0, 1), Err(Error::InvalidArgument(_))));
        assert!(matches!(a.alloc(8, 3), Err(Error::InvalidArgument(_))));
        assert!(matches!(a.alloc(4097, 1), Err(Error::ArenaFull(_))));
        let x = a.alloc(4096, 1).unwrap();
        assert!(matches!(a.alloc(1, 1), Err(Error::ArenaFull(_))));
        assert!(a.release(x + 1).is_err());
        a.release(x).unwrap();
        assert!(a.release(x).is_err(), "double release must fail");
    }

    #[test]
    fn contains_checks_inside_one_allocation() {
        let mut a = OffsetAllocator::new(1 << 16);
        let x = a.alloc(1024, 256).unwrap();
        let y = a.alloc(1024, 256).unwrap();
        assert!(a.contains(x, 1024));
        assert!(a.contains(x + 10, 100));
        assert!(!a.contains(x + 10, 1024));
        assert!(a.contains(y, 1));
        assert!(!a.contains(y + 2048, 1));
    }

    #[test]
    fn random_operations_never_overlap() {
        let mut a = OffsetAllocator::new(1 << 20);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if s % 3 == 0 && !live.is_empty() {
                let i = (s as usize / 3) % live.len();
                let (o, _) = live.swap_remove(i);
                a.release(o).unwrap();
            } else {
                let bytes = 1 + (s >> 20) % 20000;
                let align = 1u64 << ((s >> 40) % 13);
                if let Ok(o) = a.alloc(bytes, align) {
                    assert_eq!(o % align, 0);
                    assert!(o + bytes <= 1 << 20);
                    for &(lo, lb) in &live {
                        assert!(o + bytes <= lo || lo + lb <= o, "overlap");
                    }
                    live.push((o, bytes));
                }
            }
            let free: u64 = a.free.values().sum();
            assert_eq!(free + a.used_bytes(), 1 << 20, "bytes lost");
        }
    }

    #[test]
    fn ranges_near_u64_max_do_not_overflow() {
        let mut a = OffsetAllocator::new(u64::MAX);
        assert_eq!(a.largest_free(), u64::MAX);
        // A large alignment past the first byte lands at 2^63.
        let x = a.alloc(1, 1).unwrap();
        let y = a.alloc(16, 1 << 63).unwrap();
        assert_eq!((x, y), (0, 1 << 63));
        assert!(matches!(a.alloc(u64::MAX, 1), Err(Error::ArenaFull(_))));
        assert!(matches!(a.alloc(2, 1 << 63), Err(Error::ArenaFull(_))), "no second 2^63-aligned offset fits");
        // What is left: [1, 2^63) and [2^63 + 16, 2^64 - 1), both filled exactly.
        let w = a.alloc((1 << 63) - 1, 1).unwrap();
        let z = a.alloc(u64::MAX - (1 << 63) - 16, 1).unwrap();
        assert_eq!((w, z), (1, (1 << 63) + 16));
        assert_eq!((a.used_bytes(), a.largest_free()), (u64::MAX, 0));
        assert!(a.contains(z, u64::MAX - z));
        assert!(!a.contains(z, u64::MAX - z + 1));
        assert!(!a.contains(u64::MAX - 1, 2));
        assert!(!a.contains(u64::MAX, u64::MAX));
        assert!(matches!(a.alloc(1, 1), Err(Error::ArenaFull(_))));
        for o in [y, w, x, z] {
            a.release(o).unwrap();
        }
        assert_eq!((a.largest_free(), a.free.len()), (u64::MAX, 1));
        // The whole range in one piece, then with every alignment.
        assert_eq!(a.alloc(u64::MAX, 1).unwrap(), 0);
        a.release(0).unwrap();
        for shift in 0..64 {
            let o = a.alloc(u64::MAX >> 1, 1 << shift).unwrap();
            assert_eq!(o % (1 << shift), 0);
            a.release(o).unwrap();
        }
    }
}
