//! Residency: which models stay in a device arena between uses, and where.
//!
//! [`ResidencyPolicy`] is the decision logic of the residency manager, as
//! plain code with no GPU: given the models placed in a range of arena bytes,
//! who holds them and when each was last used, it decides for an `acquire`
//! whether the model is already there (a hit: no copy at all) or where it goes
//! (a miss), which unheld models are evicted and which are moved to make a
//! contiguous gap. The caller carries the decision out (device-to-device
//! moves in the listed order, then the pipelined switch into the new place)
//! and reports back with [`ResidencyPolicy::loaded`] or
//! [`ResidencyPolicy::failed`].
//!
//! The rules:
//! - a model that is held (acquired and not released) or loading (its copy
//!   in flight) is never evicted and never moved;
//! - a miss takes a free gap if one is large enough (best fit), without
//!   touching anything;
//! - otherwise, among the stretches of bytes between held or loading models,
//!   it picks the one that needs the least-recently-used evictions: in a
//!   stretch, unheld models are evicted oldest first until what remains,
//!   packed, leaves room; the stretch whose most recent eviction is oldest
//!   wins (no eviction at all beats any), ties by fewer bytes evicted;
//! - in the chosen stretch, if the evictions leave a gap that fits, nothing
//!   moves; otherwise the remaining models are packed towards the stretch's
//!   start (moves) and the model goes after them;
//! - if no stretch can ever hold the model (held models split the space), the
//!   acquire fails with a message that says how much room there is and why.
//!
//! Bytes that are not a stored model but take the same GPU memory (a
//! training job's state, kept beside the arena while the job is paused) are
//! accounted with [`ResidencyPolicy::reserve`]: placed by the same rules, held
//! until released and forgotten, counted as neither hit nor miss.
//! [`ResidencyPolicy::fits`] answers, without changing anything, whether a
//! model could be admitted, also as if some held entries were let go.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;

use crate::error::{Error, Result};

/// One use of a model, from [`ResidencyPolicy::acquire`] to
/// [`ResidencyPolicy::release`]; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What an acquire decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire<K> {
    /// The model's bytes are in place (or arriving: `loading`, then the caller
    /// waits on the copy already in flight); no copy is needed.
    Hit { offset: u64, loading: bool },
    /// The model is not resident: carry out `moves` in order, then copy the
    /// model to `offset` and report [`ResidencyPolicy::loaded`] or
    /// [`ResidencyPolicy::failed`]. `evicted` are no longer resident.
    Miss { offset: u64, evicted: Vec<K>, moves: Vec<Move<K>> },
}

/// A resident model moved inside the arena (a device-to-device copy of
/// `bytes` from `from` to `to`; the two ranges may overlap, `to < from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move<K> {
    pub model: K,
    pub from: u64,
    pub to: u64,
    pub bytes: u64,
}

/// Counters a server exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Models moved inside the arena to make room, and their bytes.
    pub moves: u64,
    pub bytes_moved: u64,
    /// Bytes of models copied in (misses that were loaded).
    pub bytes_loaded: u64,
    /// Loads that failed (the model is not resident afterwards).
    pub failed_loads: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Loading,
    Resident,
}

#[derive(Debug, Clone)]
struct Slot<K> {
    key: K,
    /// Unique per placement: tickets of an earlier placement of the same
    /// model no longer count once it failed.
    placement: u64,
    /// Bytes taken in the arena (the model's bytes rounded up to the alignment).
    size: u64,
    bytes: u64,
    state: State,
    holders: u32,
    last_use: u64,
}

impl<K> Slot<K> {
    fn pinned(&self) -> bool {
        self.holders > 0 || self.state == State::Loading
    }
}

/// The residency decisions for `capacity` bytes of an arena.
#[derive(Debug, Clone)]
pub struct ResidencyPolicy<K> {
    capacity: u64,
    align: u64,
    clock: u64,
    /// Placed models by offset.
    slots: BTreeMap<u64, Slot<K>>,
    offset_of: HashMap<K, u64>,
    /// Open tickets: the model and the placement they hold.
    tickets: HashMap<Ticket, (K, u64)>,
    counters: Counters,
}

impl<K: Clone + Eq + Hash + Debug> ResidencyPolicy<K> {
    /// A policy for `capacity` bytes whose placements are multiples of
    /// `align` (a power of two).
    pub fn new(capacity: u64, align: u64) -> Result<Self> {
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::invalid(format!("alignment {align} is not a power of two")));
        }
        Ok(ResidencyPolicy {
            capacity: capacity - capacity % align,
            align,
            clock: 0,
            slots: BTreeMap::new(),
            offset_of: HashMap::new(),
            tickets: HashMap::new(),
            counters: Counters::default(),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Where `key` is placed, if it is (resident or loading).
    pub fn offset(&self, key: &K) -> Option<u64> {
        self.offset_of.get(key).copied()
    }

    /// Whether `key`'s bytes are in place and complete.
    pub fn is_resident(&self, key: &K) -> bool {
        self.slot(key).is_some_and(|s| s.state == State::Resident)
    }

    /// How many acquires of `key` are not yet released.
    pub fn holders(&self, key: &K) -> u32 {
        self.slot(key).map_or(0, |s| s.holders)
    }

    /// Placed models: (model, offset, bytes, held, loading), by offset.
    pub fn placements(&self) -> Vec<(K, u64, u64, bool, bool)> {
        self.slots
            .iter()
            .map(|(&o, s)| (s.key.clone(), o, s.bytes, s.holders > 0, s.state == State::Loading))
            .collect()
    }

    /// Bytes taken by placed models.
    pub fn used_bytes(&self) -> u64 {
        self.slots.values().map(|s| s.size).sum()
    }

    fn slot(&self, key: &K) -> Option<&Slot<K>> {
        self.offset_of.get(key).and_then(|o| self.slots.get(o))
    }

    fn slot_mut(&mut self, key: &K) -> Option<&mut Slot<K>> {
        let o = *self.offset_of.get(key)?;
        self.slots.get_mut(&o)
    }

    fn round(&self, bytes: u64) -> Option<u64> {
        bytes.checked_next_multiple_of(self.align)
    }

    /// Starts a use of `key` (a model of `bytes` bytes); see [`Acquire`].
    /// Every successful acquire must be matched by one [`Self::release`] of
    /// its ticket.
    pub fn acquire(&mut self, key: &K, bytes: u64) -> Result<(Ticket, Acquire<K>)> {
        if bytes == 0 {
            return Err(Error::invalid(format!("model {key:?} has no bytes")));
        }
        self.clock += 1;
        let now = self.clock;
        if let Some(s) = self.slot_mut(key) {
            if s.bytes != bytes {
                return Err(Error::invalid(format!(
                    "model {key:?} is placed with {} bytes but {bytes} were asked for",
                    s.bytes
                )));
            }
            s.holders += 1;
            s.last_use = now;
            let loading = s.state == State::Loading;
            let placement = s.placement;
            let offset = self.offset_of[key];
            self.counters.hits += 1;
            self.tickets.insert(Ticket(now), (key.clone(), placement));
            return Ok((Ticket(now), Acquire::Hit { offset, loading }));
        }
        let (offset, evicted, moves) = self.place(key, bytes, now, State::Loading)?;
        self.tickets.insert(Ticket(now), (key.clone(), now));
        self.counters.misses += 1;
        Ok((Ticket(now), Acquire::Miss { offset, evicted, moves }))
    }

    /// Accounts `bytes` that are not a stored model but take room all the
    /// same (a training job's state in GPU memory): `key` is placed by the
    /// rules of a miss, resident at once (nothing to copy) and held by the
    /// returned ticket; the caller carries out `moves` of the models moved.
    /// Counted as neither hit nor miss. Ends with [`Self::release`] of the
    /// ticket, then [`Self::forget`] of the key.
    #[allow(clippy::type_complexity)]
    pub fn reserve(&mut self, key: &K, bytes: u64) -> Result<(Ticket, u64, Vec<K>, Vec<Move<K>>)> {
        if bytes == 0 {
            return Err(Error::invalid(format!("{key:?} reserves no bytes")));
        }
        if self.offset_of.contains_key(key) {
            return Err(Error::InvalidState(format!("{key:?} is placed already")));
        }
        self.clock += 1;
        let now = self.clock;
        let (offset, evicted, moves) = self.place(key, bytes, now, State::Resident)?;
        self.tickets.insert(Ticket(now), (key.clone(), now));
        Ok((Ticket(now), offset, evicted, moves))
    }

    /// Whether a model of `bytes` that is not placed could be admitted now
    /// (evicting unheld models as an acquire would), if the held entries in
    /// `let_go` were released first. Changes nothing.
    pub fn fits(&self, bytes: u64, let_go: &[K]) -> bool {
        let Some(size) = self.round(bytes).filter(|&s| s <= self.capacity && bytes > 0) else { return false };
        self.make_room(None, size, let_go).is_ok()
    }

    /// Places `key` (a miss or a reservation) at clock `now`: evicts and
    /// moves, inserts its slot held once; returns where and what went.
    #[allow(clippy::type_complexity)]
    fn place(&mut self, key: &K, bytes: u64, now: u64, state: State) -> Result<(u64, Vec<K>, Vec<Move<K>>)> {
        let size = self.round(bytes).filter(|&s| s <= self.capacity).ok_or_else(|| {
            Error::ArenaFull(format!(
                "{key:?} needs {bytes} bytes but the residency area has {} in all",
                self.capacity
            ))
        })?;
        let (offset, evicted, moves) = self.make_room(Some(key), size, &[])?;
        for k in &evicted {
            let o = self.offset_of.remove(k).expect("evicted models are placed");
            self.slots.remove(&o);
        }
        for m in &moves {
            let s = self.slots.remove(&m.from).expect("moved models are placed");
            self.offset_of.insert(m.model.clone(), m.to);
            self.slots.insert(m.to, s);
        }
        self.slots.insert(offset, Slot { key: key.clone(), placement: now, size, bytes, state, holders: 1, last_use: now });
        self.offset_of.insert(key.clone(), offset);
        self.counters.evictions += evicted.len() as u64;
        self.counters.moves += moves.len() as u64;
        self.counters.bytes_moved += moves.iter().map(|m| m.bytes).sum::<u64>();
        Ok((offset, evicted, moves))
    }

    /// Decides where a new model of `size` (aligned) bytes goes; the held
    /// entries in `let_go` count as unheld (a dry run: see [`Self::fits`]).
    #[allow(clippy::type_complexity)]
    fn make_room(&self, key: Option<&K>, size: u64, let_go: &[K]) -> Result<(u64, Vec<K>, Vec<Move<K>>)> {
        let pinned = |s: &Slot<K>| s.state == State::Loading || (s.holders > 0 && !let_go.contains(&s.key));
        // 1. A free gap: best fit, nothing touched.
        if let Some(start) = best_fit(self.slots.iter().map(|(&o, s)| (o, s.size)), 0, self.capacity, size) {
            return Ok((start, Vec::new(), Vec::new()));
        }
        // 2. The stretches between pinned models.
        let mut stretches: Vec<(u64, u64, Vec<(u64, &Slot<K>)>)> = Vec::new(); // (start, end, unpinned slots)
        let mut start = 0;
        let mut inside = Vec::new();
        for (&o, s) in &self.slots {
            if pinned(s) {
                stretches.push((start, o, std::mem::take(&mut inside)));
                start = o + s.size;
            } else {
                inside.push((o, s));
            }
        }
        stretches.push((start, self.capacity, inside));
        // Per stretch: evict oldest first until the rest, packed, leaves room.
        // Cost: (most recent eviction's last use, bytes evicted); 0 = none.
        let mut choice: Option<((u64, u64), usize, Vec<u64>)> = None;
        for (i, (s0, s1, slots)) in stretches.iter().enumerate() {
            let len = s1 - s0;
            if len < size {
                continue;
            }
            let mut by_age: Vec<&(u64, &Slot<K>)> = slots.iter().collect();
            by_age.sort_by_key(|(_, s)| s.last_use);
            let mut kept: u64 = slots.iter().map(|(_, s)| s.size).sum();
            let mut evict = Vec::new();
            let mut cost = (0, 0);
            for (o, s) in by_age {
                if len - kept >= size {
                    break;
                }
                kept -= s.size;
                evict.push(*o);
                cost = (s.last_use, cost.1 + s.size);
            }
            debug_assert!(len - kept >= size);
            if choice.as_ref().is_none_or(|c| cost < c.0) {
                choice = Some((cost, i, evict));
            }
        }
        let Some((_, i, evict)) = choice else {
            let largest = stretches.iter().map(|(a, b, _)| b - a).max().unwrap_or(0);
            let held: u64 = self.slots.values().filter(|s| pinned(s)).map(|s| s.size).sum();
            let what = key.map_or("a model".to_string(), |k| format!("{k:?}"));
            return Err(Error::ArenaFull(format!(
                "{what} needs {size} bytes; models in use or loading take {held} of the residency area's {} bytes \
                 and leave at most {largest} contiguous bytes, even after evicting every unused model",
                self.capacity
            )));
        };
        let (s0, s1, slots) = &stretches[i];
        let evicted: Vec<K> = evict.iter().map(|o| self.slots[o].key.clone()).collect();
        let kept: Vec<(u64, &Slot<K>)> = slots.iter().filter(|(o, _)| !evict.contains(o)).copied().collect();
        // A gap among what stays, without moving anything: best fit.
        if let Some(start) = best_fit(kept.iter().map(|(o, s)| (*o, s.size)), *s0, *s1, size) {
            return Ok((start, evicted, Vec::new()));
        }
        // Pack what stays towards the stretch's start; the model goes after.
        let mut moves = Vec::new();
        let mut pos = *s0;
        for (o, s) in kept {
            if o != pos {
                moves.push(Move { model: s.key.clone(), from: o, to: pos, bytes: s.bytes });
            }
            pos += s.size;
        }
        Ok((pos, evicted, moves))
    }

    /// The copy of a missed model completed: it is resident from now on.
    pub fn loaded(&mut self, key: &K) -> Result<()> {
        let s = self.slot_mut(key).ok_or_else(|| Error::NotFound(format!("model {key:?} is not placed")))?;
        if s.state != State::Loading {
            return Err(Error::InvalidState(format!("model {key:?} is not loading")));
        }
        s.state = State::Resident;
        let bytes = s.bytes;
        self.counters.bytes_loaded += bytes;
        Ok(())
    }

    /// The copy of a missed model failed (or the bytes of a placed model can
    /// no longer be trusted, e.g. a worker died writing them): it is not
    /// resident any more. Its holders still release it; the place is freed
    /// at once, and a later acquire copies the model again.
    pub fn failed(&mut self, key: &K) -> Result<()> {
        let o = self.offset_of.remove(key).ok_or_else(|| Error::NotFound(format!("model {key:?} is not placed")))?;
        let s = self.slots.remove(&o).expect("placed models have a slot");
        if s.state == State::Loading {
            self.counters.failed_loads += 1;
        }
        Ok(())
    }

    /// Ends one use. The model stays resident (if it still is).
    pub fn release(&mut self, ticket: Ticket) -> Result<()> {
        let (key, placement) = self
            .tickets
            .remove(&ticket)
            .ok_or_else(|| Error::InvalidState(format!("{ticket:?} is not an open use (released twice?)")))?;
        if let Some(s) = self.slot_mut(&key) {
            if s.placement == placement {
                s.holders -= 1;
            }
        }
        Ok(())
    }

    /// Forgets a model that is no longer stored (or whose bytes changed). A
    /// held model cannot be forgotten.
    pub fn forget(&mut self, key: &K) -> Result<()> {
        match self.slot(key) {
            None => Ok(()),
            Some(s) if s.pinned() => Err(Error::InvalidState(format!("model {key:?} is in use or loading"))),
            Some(_) => {
                let o = self.offset_of.remove(key).expect("placed");
                self.slots.remove(&o);
                Ok(())
            }
        }
    }
}

/// The start of the smallest gap of at least `size` bytes in `[start, end)`
/// around `taken` ranges (offset, size), sorted by offset.
fn best_fit(taken: impl Iterator<Item = (u64, u64)>, start: u64, end: u64, size: u64) -> Option<u64> {
    let mut best: Option<(u64, u64)> = None; // (gap length, gap start)
    let mut pos = start;
    for (o, len) in taken.chain(std::iter::once((end, 0))) {
        let gap = o.saturating_sub(pos);
        if gap >= size && best.is_none_or(|b| gap < b.0) {
            best = Some((gap, pos));
        }
        pos = pos.max(o + len);
    }
    best.map(|b| b.1)
}
