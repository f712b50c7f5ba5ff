//! The residency policy against a simple model of its rules: random acquire,
//! release, loaded and failed sequences over many models, every decision
//! checked against what the rules allow.

use std::collections::HashMap;

use pipeswitch::residency::{Acquire, ResidencyPolicy, Ticket};
use pipeswitch::Error;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ALIGN: u64 = 256;

fn round(b: u64) -> u64 {
    b.div_ceil(ALIGN) * ALIGN
}

/// What the test knows of a placed model.
#[derive(Clone, Debug)]
struct Known {
    offset: u64,
    size: u64,
    loading: bool,
    holders: u32,
    last_use: u64,
}

impl Known {
    fn pinned(&self) -> bool {
        self.holders > 0 || self.loading
    }
}

/// Stretches between pinned models: (start, end, unpinned models inside).
fn stretches(placed: &HashMap<u32, Known>, capacity: u64) -> Vec<(u64, u64, Vec<u32>)> {
    let mut by_off: Vec<(&u32, &Known)> = placed.iter().collect();
    by_off.sort_by_key(|(_, k)| k.offset);
    let mut out = Vec::new();
    let (mut start, mut inside) = (0, Vec::new());
    for (key, k) in by_off {
        if k.pinned() {
            out.push((start, k.offset, std::mem::take(&mut inside)));
            start = k.offset + k.size;
        } else {
            inside.push(*key);
        }
    }
    out.push((start, capacity, inside));
    out
}

fn largest_gap(placed: &HashMap<u32, Known>, capacity: u64) -> u64 {
    let mut r: Vec<(u64, u64)> = placed.values().map(|k| (k.offset, k.size)).collect();
    r.sort_unstable();
    let (mut pos, mut best) = (0, 0);
    for (o, s) in r.into_iter().chain(std::iter::once((capacity, 0))) {
        best = best.max(o - pos);
        pos = o + s;
    }
    best
}

fn check_layout(p: &ResidencyPolicy<u32>, placed: &HashMap<u32, Known>) {
    let list = p.placements();
    assert_eq!(list.len(), placed.len(), "placed models: policy {list:?} vs known {placed:?}");
    let mut end = 0;
    for (key, off, bytes, held, loading) in list {
        let k = &placed[&key];
        assert_eq!(off, k.offset, "model {key} offset");
        assert_eq!(round(bytes), k.size);
        assert_eq!(held, k.holders > 0, "model {key} held");
        assert_eq!(loading, k.loading, "model {key} loading");
        assert_eq!(off % ALIGN, 0);
        assert!(off >= end, "model {key} at {off} overlaps the previous one ending at {end}");
        end = off + k.size;
    }
    assert!(end <= p.capacity());
}

/// Runs one random sequence; returns (evictions, moves, refusals) so the
/// caller can check that every rule was exercised.
fn run(seed: u64, n_models: u32, capacity: u64, steps: usize) -> (u64, u64, u64) {
    let mut rng = Rng(seed | 1);
    let sizes: Vec<u64> = (0..n_models).map(|_| 1 + rng.below(capacity / 3)).collect();
    let mut p = ResidencyPolicy::<u32>::new(capacity, ALIGN).unwrap();
    let mut placed: HashMap<u32, Known> = HashMap::new();
    let mut open: Vec<(Ticket, u32, u64)> = Vec::new(); // ticket, model, placement's acquire step
    let mut placement_of: HashMap<u32, u64> = HashMap::new();
    let (mut hits, mut misses, mut evictions) = (0u64, 0u64, 0u64);
    let mut refusals = 0u64;
    let mut reserved: std::collections::HashSet<u32> = std::collections::HashSet::new();
    for step in 1..=steps as u64 {
        match rng.below(10) {
            0..=4 => {
                let key = rng.below(u64::from(n_models)) as u32;
                let bytes = sizes[key as usize];
                let size = round(bytes);
                let before = placed.clone();
                let st = stretches(&before, p.capacity());
                let can = st.iter().any(|(a, b, _)| b - a >= size);
                let free_gap = largest_gap(&before, p.capacity()) >= size;
                let packs_without_eviction = st.iter().any(|(a, b, inside)| {
                    b - a - inside.iter().map(|k| before[k].size).sum::<u64>() >= size
                });
                if !before.contains_key(&key) {
                    assert_eq!(p.fits(bytes, &[]), can, "fits({key}, {size} bytes) disagrees with the stretches");
                    // As if one held entry were let go: the stretches without it.
                    let held: Vec<u32> = before.iter().filter(|(_, k)| k.holders > 0).map(|(k, _)| *k).collect();
                    if let Some(&h) = held.get(rng.below(held.len().max(1) as u64) as usize) {
                        let mut freed = before.clone();
                        let k = freed.get_mut(&h).unwrap();
                        k.holders = 0;
                        let can_then = stretches(&freed, p.capacity()).iter().any(|(a, b, _)| b - a >= size);
                        assert_eq!(p.fits(bytes, &[h]), can_then, "fits({key}) letting {h} go");
                    }
                }
                // Now and then the bytes are a reservation instead (resident
                // at once, no miss counted); it is released like a use.
                let decision = if !before.contains_key(&key) && rng.below(5) == 0 {
                    p.reserve(&key, bytes).map(|(t, offset, evicted, moves)| {
                        reserved.insert(key);
                        (t, Acquire::Miss { offset, evicted, moves })
                    })
                } else {
                    p.acquire(&key, bytes)
                };
                match decision {
                    Ok((ticket, Acquire::Hit { offset, loading })) => {
                        let k = placed.get_mut(&key).expect("a hit must be a placed model");
                        assert_eq!(offset, k.offset);
                        assert_eq!(loading, k.loading);
                        k.holders += 1;
                        k.last_use = step;
                        hits += 1;
                        open.push((ticket, key, placement_of[&key]));
                    }
                    Ok((ticket, Acquire::Miss { offset, evicted, moves })) => {
                        assert!(!before.contains_key(&key), "miss for placed model {key}");
                        assert!(can, "placed {key} ({size} bytes) although no stretch can hold it");
                        if free_gap {
                            assert!(evicted.is_empty() && moves.is_empty(), "a free gap fitted, yet {evicted:?} / {moves:?}");
                        }
                        if packs_without_eviction {
                            assert!(evicted.is_empty(), "moving alone made room, yet {evicted:?} were evicted");
                        }
                        for e in &evicted {
                            let k = &before[e];
                            assert!(!k.pinned(), "evicted {e}, which is in use or loading");
                            placed.remove(e);
                            placement_of.remove(e);
                        }
                        for m in &moves {
                            let k = placed.get_mut(&m.model).expect("moved models are placed");
                            assert!(!k.pinned(), "moved {}, which is in use or loading", m.model);
                            assert_eq!(m.from, k.offset);
                            assert!(m.to < m.from, "moves pack towards the start");
                            k.offset = m.to;
                        }
                        // Least recently used first, within the stretch that took the model.
                        let (a, b, inside) = st.iter().find(|(a, b, _)| offset >= *a && offset + size <= *b).expect("in a stretch");
                        for e in &evicted {
                            assert!(inside.contains(e), "evicted {e} outside the stretch [{a}, {b}) used");
                            for kept in inside.iter().filter(|k| !evicted.contains(k)) {
                                assert!(
                                    before[e].last_use < before[kept].last_use,
                                    "evicted {e} (last use {}) but kept {kept} (last use {})",
                                    before[e].last_use,
                                    before[kept].last_use
                                );
                            }
                        }
                        let reservation = reserved.remove(&key);
                        placed.insert(key, Known { offset, size, loading: !reservation, holders: 1, last_use: step });
                        placement_of.insert(key, step);
                        misses += u64::from(!reservation);
                        assert!(p.is_resident(&key) == reservation, "a reservation is resident at once, a miss is loading");
                        evictions += evicted.len() as u64;
                        open.push((ticket, key, step));
                    }
                    Err(Error::ArenaFull(msg)) => {
                        assert!(!can, "refused {key} ({size} bytes) although a stretch could hold it: {msg}");
                        assert!(msg.contains("bytes"), "{msg}");
                        refusals += 1;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            5..=7 => {
                if open.is_empty() {
                    continue;
                }
                let i = rng.below(open.len() as u64) as usize;
                let (ticket, key, placement) = open.swap_remove(i);
                p.release(ticket).unwrap();
                if placement_of.get(&key) == Some(&placement) {
                    placed.get_mut(&key).unwrap().holders -= 1;
                }
                assert!(p.release(ticket).is_err(), "a second release of a ticket must fail");
            }
            8 => {
                let loading: Vec<u32> = placed.iter().filter(|(_, k)| k.loading).map(|(k, _)| *k).collect();
                if let Some(&key) = loading.get(rng.below(loading.len().max(1) as u64) as usize) {
                    p.loaded(&key).unwrap();
                    placed.get_mut(&key).unwrap().loading = false;
                    assert!(p.is_resident(&key));
                }
            }
            _ => {
                if rng.below(4) == 0 {
                    let keys: Vec<u32> = placed.keys().copied().collect();
                    if let Some(&key) = keys.get(rng.below(keys.len().max(1) as u64) as usize) {
                        p.failed(&key).unwrap();
                        placed.remove(&key);
                        placement_of.remove(&key);
                        assert!(!p.is_resident(&key));
                    }
                }
            }
        }
        check_layout(&p, &placed);
        let c = p.counters();
        assert_eq!((c.hits, c.misses, c.evictions), (hits, misses, evictions));
    }
    (evictions, p.counters().moves, refusals)
}

#[test]
fn random_sequences_follow_the_rules() {
    let mut seen = (0, 0, 0);
    for seed in 1..200u64 {
        let (e, m, r) = run(seed * 7919, 3 + (seed % 12) as u32, (1 + seed % 7) << 20, 400);
        seen = (seen.0 + e, seen.1 + m, seen.2 + r);
    }
    assert!(seen.0 > 100 && seen.1 > 100 && seen.2 > 100, "evictions, moves, refusals: {seen:?}");
}

#[test]
fn two_of_three_fit_lru_goes() {
    let mut p = ResidencyPolicy::<&str>::new(1000 * ALIGN, ALIGN).unwrap();
    let size = 450 * ALIGN;
    for m in ["a", "b"] {
        let (t, a) = p.acquire(&m, size).unwrap();
        assert!(matches!(a, Acquire::Miss { ref evicted, .. } if evicted.is_empty()));
        p.loaded(&m).unwrap();
        p.release(t).unwrap();
    }
    // a used again: b is now the least recently used.
    let (t, a) = p.acquire(&"a", size).unwrap();
    assert_eq!(a, Acquire::Hit { offset: 0, loading: false });
    p.release(t).unwrap();
    let (t, a) = p.acquire(&"c", size).unwrap();
    match a {
        Acquire::Miss { offset, evicted, moves } => {
            assert_eq!(evicted, vec!["b"]);
            assert!(moves.is_empty());
            assert_eq!(offset, size);
        }
        other => panic!("{other:?}"),
    }
    p.loaded(&"c").unwrap();
    p.release(t).unwrap();
    let c = p.counters();
    assert_eq!((c.hits, c.misses, c.evictions, c.bytes_loaded), (1, 3, 1, 3 * size));
}

#[test]
fn held_and_loading_models_stay_and_a_clear_error_says_why() {
    let mut p = ResidencyPolicy::<&str>::new(100 * ALIGN, ALIGN).unwrap();
    // x is held in the middle: no stretch holds 60.
    let (_, _) = p.acquire(&"w", 30 * ALIGN).unwrap();
    let (tx, _) = p.acquire(&"x", 30 * ALIGN).unwrap();
    p.loaded(&"x").unwrap();
    let err = p.acquire(&"y", 60 * ALIGN).unwrap_err();
    assert!(matches!(err, Error::ArenaFull(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("in use or loading") && msg.contains("contiguous"), "{msg}");
    // w is still loading and x held: neither may go.
    assert_eq!(p.offset(&"w"), Some(0));
    assert_eq!(p.offset(&"x"), Some(30 * ALIGN));
    p.release(tx).unwrap();
    // x unused now, but w is still loading at 0: y goes after w, evicting x.
    let (_, a) = p.acquire(&"y", 60 * ALIGN).unwrap();
    assert_eq!(a, Acquire::Miss { offset: 30 * ALIGN, evicted: vec!["x"], moves: vec![] });
    // Larger than the whole area.
    assert!(matches!(p.acquire(&"z", 101 * ALIGN), Err(Error::ArenaFull(_))));
}

#[test]
fn fragmentation_is_solved_by_moving_unused_models() {
    let mut p = ResidencyPolicy::<u32>::new(100 * ALIGN, ALIGN).unwrap();
    // Five models of 20, then free the 2nd and 4th: 40 free in two holes of 20.
    let mut tickets = Vec::new();
    for m in 0..5u32 {
        let (t, _) = p.acquire(&m, 20 * ALIGN).unwrap();
        p.loaded(&m).unwrap();
        tickets.push(t);
    }
    for t in tickets {
        p.release(t).unwrap();
    }
    p.forget(&1).unwrap();
    p.forget(&3).unwrap();
    let (_, a) = p.acquire(&9, 40 * ALIGN).unwrap();
    match a {
        Acquire::Miss { offset, evicted, moves } => {
            assert!(evicted.is_empty(), "moving made room: nothing to evict, got {evicted:?}");
            assert_eq!(offset, 60 * ALIGN);
            let moved: Vec<(u32, u64, u64)> = moves.iter().map(|m| (m.model, m.from / ALIGN, m.to / ALIGN)).collect();
            assert_eq!(moved, vec![(2, 40, 20), (4, 80, 40)]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.counters().bytes_moved, 40 * ALIGN);
}

#[test]
fn failed_loads_are_not_resident_and_their_tickets_still_release() {
    let mut p = ResidencyPolicy::<&str>::new(100 * ALIGN, ALIGN).unwrap();
    let (t1, _) = p.acquire(&"m", 10 * ALIGN).unwrap();
    let (t2, a) = p.acquire(&"m", 10 * ALIGN).unwrap();
    assert_eq!(a, Acquire::Hit { offset: 0, loading: true });
    p.failed(&"m").unwrap();
    assert!(!p.is_resident(&"m"));
    // A new acquire copies it again; the old tickets do not count for it.
    let (t3, a) = p.acquire(&"m", 10 * ALIGN).unwrap();
    assert!(matches!(a, Acquire::Miss { .. }));
    p.release(t1).unwrap();
    p.release(t2).unwrap();
    assert_eq!(p.holders(&"m"), 1);
    p.release(t3).unwrap();
    assert_eq!(p.holders(&"m"), 0);
    assert!(p.release(t3).is_err());
    assert_eq!(p.counters().failed_loads, 1);
    // Wrong size for a placed model, zero bytes, forgetting a held model.
    assert!(p.acquire(&"m", 11 * ALIGN).is_err());
    assert!(p.acquire(&"n", 0).is_err());
    let (_t, _) = p.acquire(&"m", 10 * ALIGN).unwrap();
    assert!(p.forget(&"m").is_err());
}

#[test]
fn a_reservation_takes_room_like_a_held_model_and_fits_answers_without_changing_anything() {
    let mut p = ResidencyPolicy::new(100 * ALIGN, ALIGN).unwrap();
    // Three unused models fill 90 of 100.
    for m in ["a", "b", "c"] {
        let (t, _) = p.acquire(&m, 30 * ALIGN).unwrap();
        p.loaded(&m).unwrap();
        p.release(t).unwrap();
    }
    let before = p.counters();
    assert!(p.fits(40 * ALIGN, &[]), "evicting unused models makes room");
    assert!(!p.fits(101 * ALIGN, &[]) && !p.fits(0, &[]));
    assert_eq!(p.placements().len(), 3, "fits changes nothing");
    // A reservation of 50 evicts the two least recently used, is resident
    // at once and counts as neither hit nor miss.
    let (train, _, evicted, _) = p.reserve(&"train", 50 * ALIGN).unwrap();
    assert_eq!(evicted, vec!["a", "b"]);
    assert!(p.is_resident(&"train") && p.holders(&"train") == 1);
    let c = p.counters();
    assert_eq!((c.hits, c.misses, c.evictions), (before.hits, before.misses, before.evictions + 2));
    assert!(p.reserve(&"train", 50 * ALIGN).is_err(), "reserved twice");
    assert!(p.reserve(&"x", 0).is_err());
    // It went to [0, 50) ("c" stays at [60, 90)). With "c" held, gaps of
    // 10 are left; a model of 60 fits only if the reservation were let go.
    let (tc, _) = p.acquire(&"c", 30 * ALIGN).unwrap();
    assert!(p.fits(10 * ALIGN, &[]));
    assert!(!p.fits(20 * ALIGN, &[]));
    assert!(!p.fits(60 * ALIGN, &[]));
    assert!(p.fits(60 * ALIGN, &["train"]));
    assert!(!p.fits(80 * ALIGN, &["train"]), "held \"c\" still takes 30");
    assert!(p.fits(80 * ALIGN, &["train", "c"]));
    let e = p.acquire(&"d", 60 * ALIGN).unwrap_err();
    assert!(matches!(e, Error::ArenaFull(_)), "{e}");
    // Released and forgotten: the room is back.
    p.release(train).unwrap();
    p.forget(&"train").unwrap();
    assert!(p.fits(60 * ALIGN, &[]));
    let (_, a) = p.acquire(&"d", 60 * ALIGN).unwrap();
    assert!(matches!(a, Acquire::Miss { .. }));
    p.release(tc).unwrap();
}
