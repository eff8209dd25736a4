//! A slab whose keys carry the generation of their slot: a key kept past its value's removal
//! (the slot since reused by another value) finds nothing, never the newer value.

use std::marker::PhantomData;

/// Names one value of a [`Slab`]: its slot and the slot's generation when it was inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// A key no value ever has (its slot would be the 2^32nd).
    pub(crate) const NEVER: Key = Key {
        index: u32::MAX,
        generation: u32::MAX,
    };

    /// The key as one integer (an epoll tag, a handle kept by a binding).
    pub(crate) fn to_raw(self) -> u64 {
        u64::from(self.index) | (u64::from(self.generation) << 32)
    }

    /// The key back from [`Key::to_raw`]. A made-up value is a key like any stale one: the slab
    /// finds nothing under it (unless it names a live value exactly).
    pub(crate) fn from_raw(raw: u64) -> Self {
        Self {
            index: (raw & 0xffff_ffff) as u32,
            generation: (raw >> 32) as u32,
        }
    }

    /// The slot, for tables kept beside the slab (one entry per slot).
    pub(crate) fn index(self) -> u32 {
        self.index
    }
}

/// A key type of a [`Slab`]: [`Key`] itself, or a public handle wrapping one.
pub(crate) trait SlabKey: Copy {
    fn from_key(key: Key) -> Self;
    fn key(self) -> Key;
}

impl SlabKey for Key {
    fn from_key(key: Key) -> Self {
        key
    }

    fn key(self) -> Key {
        self
    }
}

struct Slot<V> {
    /// Bumped by every insert into the slot: keys of earlier values no longer match.
    generation: u32,
    value: Option<V>,
}

/// Values under generation-checked keys; slots are reused, keys are not (until a slot's
/// generation wraps, after 2^32 values in that one slot).
pub(crate) struct Slab<V, K: SlabKey = Key> {
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    len: usize,
    keys: PhantomData<K>,
}

impl<V, K: SlabKey> Default for Slab<V, K> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            keys: PhantomData,
        }
    }
}

impl<V, K: SlabKey> Slab<V, K> {
    /// Stores `value`; returns its key.
    pub(crate) fn insert(&mut self, value: V) -> K {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.value = Some(value);
        self.len += 1;
        K::from_key(Key {
            index,
            generation: slot.generation,
        })
    }

    /// The key the next [`Slab::insert`] returns.
    pub(crate) fn next_key(&self) -> K {
        let index = match self.free.last() {
            Some(&index) => index,
            None => self.slots.len() as u32,
        };
        let generation = self
            .slots
            .get(index as usize)
            .map_or(0, |slot| slot.generation);
        K::from_key(Key {
            index,
            generation: generation.wrapping_add(1),
        })
    }

    /// The value under `key`, if it is still there.
    pub(crate) fn get(&self, key: K) -> Option<&V> {
        let key = key.key();
        match self.slots.get(key.index as usize) {
            Some(slot) if slot.generation == key.generation => slot.value.as_ref(),
            _ => None,
        }
    }

    /// The value under `key`, if it is still there.
    pub(crate) fn get_mut(&mut self, key: K) -> Option<&mut V> {
        let key = key.key();
        match self.slots.get_mut(key.index as usize) {
            Some(slot) if slot.generation == key.generation => slot.value.as_mut(),
            _ => None,
        }
    }

    /// Takes the value under `key` out; its slot may then hold another value, under another key.
    pub(crate) fn remove(&mut self, key: K) -> Option<V> {
        let key = key.key();
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    /// Values stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slots ever made (the bound of [`Key::index`]).
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The key of the value in slot `index`, if one is there.
    pub(crate) fn key_at(&self, index: u32) -> Option<K> {
        let slot = self.slots.get(index as usize)?;
        slot.value.as_ref().map(|_| {
            K::from_key(Key {
                index,
                generation: slot.generation,
            })
        })
    }

    /// Takes every value out, by slot (their keys then find nothing).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (K, V)> + '_ {
        self.len = 0;
        self.free.clear();
        self.free.extend((0..self.slots.len() as u32).rev());
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| {
                let generation = slot.generation;
                slot.value.take().map(|value| {
                    let key = Key {
                        index: index as u32,
                        generation,
                    };
                    (K::from_key(key), value)
                })
            })
    }

    /// Every key with its value, by slot.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (K, &mut V)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| {
                let generation = slot.generation;
                slot.value.as_mut().map(|value| {
                    let key = Key {
                        index: index as u32,
                        generation,
                    };
                    (K::from_key(key), value)
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_key_finds_nothing_after_its_slot_is_reused() {
        let mut slab: Slab<_> = Slab::default();
        let old = slab.insert("old");
        assert_eq!(slab.remove(old), Some("old"));
        let predicted = slab.next_key();
        let new = slab.insert("new");
        assert_eq!(predicted, new);
        assert_eq!(new.index(), old.index(), "the slot is reused");
        assert_ne!(new, old);
        assert_eq!(
            slab.get(old),
            None,
            "a stale key must not find the new value"
        );
        assert_eq!(slab.get_mut(old), None);
        assert_eq!(slab.remove(old), None);
        assert_eq!(
            slab.get(new),
            Some(&"new"),
            "the stale removal left the new value alone"
        );
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn keys_round_trip_through_raw_and_made_up_ones_find_nothing() {
        let mut slab: Slab<_> = Slab::default();
        let a = slab.insert(1);
        let b = slab.insert(2);
        assert_eq!(Key::from_raw(b.to_raw()), b);
        assert_eq!(slab.get(Key::from_raw(b.to_raw())), Some(&2));
        assert_eq!(slab.get(Key::from_raw(u64::MAX)), None);
        let wrong_generation = Key::from_raw(a.to_raw() + (1 << 32));
        assert_eq!(slab.get(wrong_generation), None);
    }

    #[test]
    fn slots_and_keys_are_listed_while_their_values_live() {
        let mut slab: Slab<_> = Slab::default();
        let a = slab.insert('a');
        let b = slab.insert('b');
        slab.remove(a);
        assert_eq!(slab.slots(), 2);
        assert_eq!(slab.key_at(a.index()), None);
        assert_eq!(slab.key_at(b.index()), Some(b));
        let listed: Vec<_> = slab.iter_mut().map(|(key, value)| (key, *value)).collect();
        assert_eq!(listed, vec![(b, 'b')]);
    }
}
