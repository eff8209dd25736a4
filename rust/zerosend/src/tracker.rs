//! Matching MSG_ZEROCOPY completion ranges to the sends that caused them.
//!
//! The kernel numbers every successful zero-copy `sendmsg` on a socket with a 32-bit counter that
//! wraps. Completions arrive on the error queue as inclusive ranges `[lo, hi]` of those numbers;
//! ranges coalesce and may arrive out of order. The tracker remembers, for each number not yet
//! completed, which send owns it, and hands the owner back exactly once per number.

use std::collections::VecDeque;

/// Outstanding zero-copy send numbers of one socket, oldest first.
#[derive(Debug)]
pub struct ZerocopyTracker<K> {
    /// Number of the oldest outstanding entry (`slots[0]`).
    base: u32,
    /// `Some(owner)` while the number is outstanding, `None` once completed.
    slots: VecDeque<Option<K>>,
    outstanding: usize,
}

impl<K: Copy> Default for ZerocopyTracker<K> {
    fn default() -> Self {
        Self::starting_at(0)
    }
}

impl<K: Copy> ZerocopyTracker<K> {
    /// A tracker whose next number is `first` (the kernel starts every socket at 0).
    pub fn starting_at(first: u32) -> Self {
        Self {
            base: first,
            slots: VecDeque::new(),
            outstanding: 0,
        }
    }

    /// Records that the next successful zero-copy send belongs to `owner`; returns its number.
    pub fn push(&mut self, owner: K) -> u32 {
        let id = self.next_number();
        self.slots.push_back(Some(owner));
        self.outstanding += 1;
        id
    }

    /// The number the next successful zero-copy send will get.
    pub fn next_number(&self) -> u32 {
        self.base.wrapping_add(self.slots.len() as u32)
    }

    /// The oldest number still waiting for its completion, if any.
    pub fn oldest(&self) -> Option<u32> {
        (self.outstanding > 0).then_some(self.base)
    }

    /// Number of sends still waiting for their completion.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Marks `[lo, hi]` (inclusive, wrapping) completed and calls `done` once for the owner of each
    /// number that was outstanding. Numbers we never issued or already completed are ignored, so a
    /// duplicate or foreign range cannot release a buffer twice. Returns how many were completed.
    pub fn complete(&mut self, lo: u32, hi: u32, mut done: impl FnMut(K)) -> usize {
        let span = u64::from(hi.wrapping_sub(lo)) + 1;
        let issued = self.slots.len() as u64;
        // Clip the range to the window of numbers we issued, [base, base + issued).
        let offset = u64::from(lo.wrapping_sub(self.base));
        let (first, last) = if offset < issued {
            (offset, (offset + span).min(issued))
        } else {
            // The range starts before our window (or lies wholly outside it).
            let skip = u64::from(self.base.wrapping_sub(lo));
            if skip >= span {
                return 0;
            }
            (0, (span - skip).min(issued))
        };
        let mut completed = 0;
        for index in first..last {
            if let Some(owner) = self.slots[index as usize].take() {
                completed += 1;
                done(owner);
            }
        }
        self.outstanding -= completed;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base = self.base.wrapping_add(1);
        }
        completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(t: &mut ZerocopyTracker<u32>, lo: u32, hi: u32) -> Vec<u32> {
        let mut v = Vec::new();
        t.complete(lo, hi, |k| v.push(k));
        v
    }

    #[test]
    fn in_order_single_completions() {
        let mut t = ZerocopyTracker::default();
        assert_eq!(t.push(10), 0);
        assert_eq!(t.push(11), 1);
        assert_eq!(collect(&mut t, 0, 0), vec![10]);
        assert_eq!(collect(&mut t, 1, 1), vec![11]);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn coalesced_range_releases_every_owner_once() {
        let mut t = ZerocopyTracker::default();
        for k in 0..5 {
            t.push(k);
        }
        assert_eq!(collect(&mut t, 0, 4), vec![0, 1, 2, 3, 4]);
        assert_eq!(
            collect(&mut t, 0, 4),
            Vec::<u32>::new(),
            "duplicate range ignored"
        );
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn out_of_order_ranges() {
        let mut t = ZerocopyTracker::default();
        for k in 0..6 {
            t.push(k);
        }
        assert_eq!(t.oldest(), Some(0));
        assert_eq!(collect(&mut t, 3, 5), vec![3, 4, 5]);
        assert_eq!(t.outstanding(), 3);
        assert_eq!(t.oldest(), Some(0));
        assert_eq!(collect(&mut t, 1, 1), vec![1]);
        assert_eq!(collect(&mut t, 0, 0), vec![0]);
        assert_eq!(collect(&mut t, 2, 2), vec![2]);
        assert_eq!(t.outstanding(), 0);
        // The next number continues after the last issued one.
        assert_eq!(t.push(6), 6);
    }

    #[test]
    fn wraps_around_u32() {
        let mut t = ZerocopyTracker::starting_at(u32::MAX - 1);
        assert_eq!(t.push(1), u32::MAX - 1);
        assert_eq!(t.push(2), u32::MAX);
        assert_eq!(t.push(3), 0);
        assert_eq!(t.push(4), 1);
        // A range that itself wraps.
        assert_eq!(collect(&mut t, u32::MAX, 0), vec![2, 3]);
        assert_eq!(collect(&mut t, 1, 1), vec![4]);
        assert_eq!(collect(&mut t, u32::MAX - 1, u32::MAX - 1), vec![1]);
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.push(5), 2);
    }

    #[test]
    fn foreign_numbers_are_ignored() {
        let mut t = ZerocopyTracker::starting_at(100);
        t.push(7);
        assert_eq!(collect(&mut t, 5, 50), Vec::<u32>::new());
        assert_eq!(collect(&mut t, 101, 200), Vec::<u32>::new());
        assert_eq!(collect(&mut t, 90, 100), vec![7]);
    }

    #[test]
    fn many_owners_shuffled() {
        let mut t = ZerocopyTracker::starting_at(u32::MAX - 500);
        for k in 0..1000u32 {
            t.push(k);
        }
        // Complete in a scrambled order of small ranges.
        let mut seen = vec![false; 1000];
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by_key(|i| (i * 37) % 100);
        for chunk in order {
            let lo = (u32::MAX - 500).wrapping_add(chunk * 10);
            for k in collect(&mut t, lo, lo.wrapping_add(9)) {
                assert!(!seen[k as usize]);
                seen[k as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn oldest_is_the_first_number_still_waiting() {
        let mut t = ZerocopyTracker::starting_at(100);
        assert_eq!(t.oldest(), None, "nothing issued");
        t.push(1);
        t.push(2);
        assert_eq!(t.oldest(), Some(100));
        assert_eq!(collect(&mut t, 100, 101), vec![1, 2]);
        assert_eq!(t.oldest(), None, "everything completed");
    }

    #[test]
    fn a_range_that_starts_before_the_window_completes_only_its_own_numbers() {
        let mut t = ZerocopyTracker::starting_at(100);
        for k in 0..10 {
            t.push(k);
        }
        // 97..=101: the three numbers before the window are foreign, 100 and 101 are ours
        assert_eq!(collect(&mut t, 97, 101), vec![0, 1]);
        assert_eq!(t.outstanding(), 8);
        assert_eq!(
            collect(&mut t, 90, 91),
            Vec::<u32>::new(),
            "wholly before the window"
        );
        assert_eq!(t.outstanding(), 8);
    }
}
