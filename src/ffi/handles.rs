//! The registry of handles given to C.
//!
//! A handle is not an address. It is an id drawn from a process-wide
//! counter, so never given out twice, spelt as a pointer of the handle's C
//! type (the header's types stay opaque structs): `0x5053` ("PS") in the top
//! 16 bits, the id above an odd low bit, so it is never the address of
//! anything (a non-canonical address on x86-64 and arm64, and odd).
//!
//! The registry maps each live id to its object, an `Arc`, and the object's
//! type. A call looks its handle up and clones the `Arc` under the registry
//! lock, which it lets go at once: an object that another thread frees
//! meanwhile lives until the calls holding it return, and is dropped with
//! the last of them. A freed id is refused for good: a second free, from any
//! thread, gets `PS_ERR_INVALID_HANDLE`, and no later object answers to it.
//! A live handle of one type passed as another is refused, never
//! reinterpreted.
//!
//! Objects that calls change (switches, workers) keep an `RwLock` inside
//! their `ps_` struct ([`Lockable`]); [`read`] and [`write`] give a call the
//! object alive and locked until it returns. Calls that only look take the
//! lock shared (e.g. `ps_switch_wait_group` from several threads, or a
//! worker's run, which reads its switch); calls that change the object take
//! it exclusively (`ps_switch_start`), so they cannot interleave. Lock
//! order: a call that takes two takes the worker's before the switch's.

use std::any::{type_name, Any, TypeId};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};

const _: () = assert!(usize::BITS == 64, "handles are 64-bit ids");

/// The top 16 bits of every handle: "PS".
const TAG: u64 = 0x5053 << 48;
/// Ids below this fit between the tag and the low bit.
const ID_LIMIT: u64 = 1 << 47;

struct Entry {
    obj: Arc<dyn Any + Send + Sync>,
    /// The object's type, for messages ("store", "switch").
    kind: &'static str,
}

fn registry() -> MutexGuard<'static, HashMap<u64, Entry>> {
    static LIVE: OnceLock<Mutex<HashMap<u64, Entry>>> = OnceLock::new();
    // The registry's own state is consistent between statements: a poisoned
    // lock (a panic elsewhere while it was held) leaves nothing half-done.
    LIVE.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner())
}

/// "store" for `ps_store`: the C type's name without its prefix.
fn kind_of<T>() -> &'static str {
    let name = type_name::<T>();
    let name = name.rsplit("::").next().unwrap_or(name);
    name.strip_prefix("ps_").unwrap_or(name)
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    // 2^47 handles: more than four years of a million a second.
    assert!(id < ID_LIMIT, "the process has used up its 2^47 handle ids");
    id
}

fn encode(id: u64) -> usize {
    (TAG | id << 1 | 1) as usize
}

/// Hands an object to C: a new handle, never given out before.
pub(crate) fn register<T: Send + Sync + 'static>(obj: T) -> *mut T {
    let handle = encode(next_id());
    let entry = Entry { obj: Arc::new(obj), kind: kind_of::<T>() };
    registry().insert(handle as u64, entry);
    handle as *mut T
}

/// The registry key of a handle. Any value but NULL is looked up: one that
/// no handle ever had is simply not found, and nothing is dereferenced.
fn key<T>(p: *const T, what: &'static str) -> Result<u64> {
    if p.is_null() {
        return Err(Error::NullArgument(what));
    }
    Ok(p as usize as u64)
}

fn wrong_type<T>(found: &Entry, what: &'static str) -> Error {
    debug_assert_ne!(found.kind, kind_of::<T>());
    Error::HandleType { expected: what, found: found.kind }
}

/// The object of a live handle, kept alive for as long as the caller holds it.
pub(crate) fn get<T: Send + Sync + 'static>(p: *const T, what: &'static str) -> Result<Arc<T>> {
    let k = key(p, what)?;
    let obj = {
        let live = registry();
        let e = live.get(&k).ok_or(Error::InvalidHandle(what))?;
        if e.obj.as_ref().type_id() != TypeId::of::<T>() {
            return Err(wrong_type::<T>(e, what));
        }
        e.obj.clone()
    };
    obj.downcast::<T>().map_err(|_| Error::Internal("a handle's type changed".into()))
}

/// Frees a handle. NULL does nothing; a handle that is not live (or is of
/// another type) is an error. The object goes when the last call that holds
/// it returns; its drop runs outside the registry lock.
pub(crate) fn free<T: Send + Sync + 'static>(p: *mut T, what: &'static str) -> Result<()> {
    if p.is_null() {
        return Ok(());
    }
    let k = key(p, what)?;
    let obj = {
        let mut live = registry();
        let e = live.get(&k).ok_or(Error::InvalidHandle(what))?;
        if e.obj.as_ref().type_id() != TypeId::of::<T>() {
            return Err(wrong_type::<T>(e, what));
        }
        live.remove(&k).map(|e| e.obj)
    };
    drop(obj);
    Ok(())
}

/// A `ps_` struct whose object calls change: it sits behind a lock.
pub(crate) trait Lockable: Send + Sync + 'static {
    type Inner: Send + Sync + 'static;
    fn lock(&self) -> &RwLock<Self::Inner>;
}

fn poisoned(what: &'static str) -> Error {
    Error::InvalidState(format!("a call panicked while it changed this {what}; free it and make a new one"))
}

/// Shared access to a handle's object for one call.
pub(crate) struct Read<T: 'static> {
    // Declared first, so dropped before `_owner`, whose allocation it borrows.
    guard: RwLockReadGuard<'static, T>,
    _owner: Arc<dyn Any + Send + Sync>,
}

/// Exclusive access to a handle's object for one call.
pub(crate) struct Write<T: 'static> {
    // Declared first, so dropped before `_owner`, whose allocation it borrows.
    guard: RwLockWriteGuard<'static, T>,
    _owner: Arc<dyn Any + Send + Sync>,
}

/// The lock of `owner`, borrowed for as long as a guard holds `owner`.
///
/// # Safety
/// The result must not outlive `owner` (nor any clone of it that the caller
/// keeps): [`Read`] and [`Write`] drop their guard before their `Arc`.
unsafe fn lock_of<H: Lockable>(owner: &Arc<H>) -> &'static RwLock<H::Inner> {
    // SAFETY: the RwLock lies inside the Arc's allocation, which does not
    // move and lives while the caller's clone of the Arc does.
    unsafe { &*(owner.lock() as *const RwLock<H::Inner>) }
}

/// The object of a live handle, shared with other readers for one call.
pub(crate) fn read<H: Lockable>(p: *const H, what: &'static str) -> Result<Read<H::Inner>> {
    let owner = get(p, what)?;
    // SAFETY: the guard goes into a Read together with `owner`, and is dropped first.
    let lock = unsafe { lock_of(&owner) };
    let guard = lock.read().map_err(|_| poisoned(what))?;
    Ok(Read { guard, _owner: owner })
}

/// The object of a live handle, alone for one call (waits for other calls on it).
pub(crate) fn write<H: Lockable>(p: *const H, what: &'static str) -> Result<Write<H::Inner>> {
    let owner = get(p, what)?;
    // SAFETY: the guard goes into a Write together with `owner`, and is dropped first.
    let lock = unsafe { lock_of(&owner) };
    let guard = lock.write().map_err(|_| poisoned(what))?;
    Ok(Write { guard, _owner: owner })
}

impl<T> Deref for Read<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> Deref for Write<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for Write<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Barrier;
    use std::thread;
    use std::time::Duration;

    struct ps_thing {
        value: u64,
        dropped: Arc<AtomicBool>,
    }
    impl Drop for ps_thing {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    struct ps_other(u64);

    struct ps_counter {
        inner: RwLock<Vec<u64>>,
    }
    impl Lockable for ps_counter {
        type Inner = Vec<u64>;
        fn lock(&self) -> &RwLock<Vec<u64>> {
            &self.inner
        }
    }

    fn thing(value: u64) -> (*mut ps_thing, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        (register(ps_thing { value, dropped: dropped.clone() }), dropped)
    }

    #[test]
    fn handles_are_tagged_odd_and_never_reused() {
        let (a, _) = thing(1);
        let (b, _) = thing(2);
        for h in [a as u64, b as u64] {
            assert_eq!(h >> 48, 0x5053, "{h:#x}");
            assert_eq!(h & 1, 1, "{h:#x}");
        }
        assert!(b as u64 > a as u64);
        free(a, "thing").unwrap();
        let (c, _) = thing(3);
        assert_ne!(c, a);
        assert!(matches!(get(a, "thing"), Err(Error::InvalidHandle("thing"))));
        assert_eq!(get(c, "thing").unwrap().value, 3);
        free(b, "thing").unwrap();
        free(c, "thing").unwrap();
        assert_eq!(kind_of::<ps_thing>(), "thing");
    }

    #[test]
    fn null_free_and_double_free() {
        assert!(matches!(get::<ps_thing>(std::ptr::null(), "thing"), Err(Error::NullArgument("thing"))));
        free::<ps_thing>(std::ptr::null_mut(), "thing").unwrap();
        let (a, dropped) = thing(1);
        free(a, "thing").unwrap();
        assert!(dropped.load(Ordering::SeqCst));
        assert!(matches!(free(a, "thing"), Err(Error::InvalidHandle("thing"))));
    }

    #[test]
    fn a_handle_of_another_type_is_refused_and_kept() {
        let (a, dropped) = thing(5);
        let as_other = a.cast::<ps_other>();
        let e = get(as_other, "other").err().unwrap();
        assert!(matches!(e, Error::HandleType { expected: "other", found: "thing" }), "{e}");
        assert!(free(as_other, "other").is_err());
        assert!(!dropped.load(Ordering::SeqCst));
        assert_eq!(get(a, "thing").unwrap().value, 5);
        let o = register(ps_other(9));
        assert_eq!(get(o, "other").unwrap().0, 9);
        free(o, "other").unwrap();
        free(a, "thing").unwrap();
    }

    #[test]
    fn an_object_freed_while_in_use_lives_until_the_use_ends() {
        let (a, dropped) = thing(7);
        let held = get(a, "thing").unwrap();
        free(a, "thing").unwrap();
        assert!(!dropped.load(Ordering::SeqCst), "dropped under a call that holds it");
        assert!(get(a, "thing").is_err());
        assert_eq!(held.value, 7);
        drop(held);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_writer_excludes_readers_and_other_writers() {
        let h = register(ps_counter { inner: RwLock::new(Vec::new()) });
        let raw = h as usize;
        let go = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let go = go.clone();
                thread::spawn(move || {
                    let h = raw as *const ps_counter;
                    go.wait();
                    for i in 0..200 {
                        if (t + i) % 3 == 0 {
                            // A reader sees whole pushes only: pairs (x, x).
                            let r = read(h, "counter").unwrap();
                            assert!(r.chunks(2).all(|c| c.len() == 2 && c[0] == c[1]), "a torn write");
                        } else {
                            let mut w = write(h, "counter").unwrap();
                            w.push(t * 1000 + i);
                            thread::yield_now();
                            w.push(t * 1000 + i);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(read(h, "counter").unwrap().len(), 2 * (800 - 267));
        free(h, "counter").unwrap();
    }

    #[test]
    fn a_locked_object_freed_meanwhile_stays_usable_by_its_call() {
        let h = register(ps_counter { inner: RwLock::new(vec![1]) });
        let raw = h as usize;
        let mut w = write(h, "counter").unwrap();
        let freer = thread::spawn(move || free(raw as *mut ps_counter, "counter"));
        freer.join().unwrap().unwrap();
        // The free did not wait for the lock, and the call goes on.
        w.push(2);
        assert_eq!(*w, vec![1, 2]);
        drop(w);
        assert!(matches!(read(h, "counter"), Err(Error::InvalidHandle("counter"))));
    }

    #[test]
    fn a_call_that_panicked_while_writing_leaves_the_object_refused() {
        let h = register(ps_counter { inner: RwLock::new(vec![]) });
        let raw = h as usize;
        let r = thread::spawn(move || {
            let mut w = write(raw as *const ps_counter, "counter").unwrap();
            w.push(1);
            panic!("inside a call");
        })
        .join();
        assert!(r.is_err());
        let e = read(h, "counter").err().unwrap();
        assert!(matches!(e, Error::InvalidState(_)), "{e}");
        assert!(e.to_string().contains("panicked"), "{e}");
        free(h, "counter").unwrap();
    }

    #[test]
    fn readers_share_the_lock() {
        let h = register(ps_counter { inner: RwLock::new(vec![]) });
        let raw = h as usize;
        let r1 = read(h, "counter").unwrap();
        // A second reader in another thread gets in while the first holds it.
        let t = thread::spawn(move || read(raw as *const ps_counter, "counter").map(|r| r.len()));
        let started = std::time::Instant::now();
        while !t.is_finished() {
            assert!(started.elapsed() < Duration::from_secs(10), "a reader waited for a reader");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(t.join().unwrap().unwrap(), 0);
        drop(r1);
        free(h, "counter").unwrap();
    }
}
