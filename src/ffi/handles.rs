//! The registry of live handles. Every object handed to C is registered
//! here; every call checks its handle first, so a NULL, freed (double free)
//! or foreign pointer gives `PS_ERR_NULL_ARGUMENT` or `PS_ERR_INVALID_HANDLE`
//! instead of undefined behaviour.

use std::any::TypeId;
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};

fn live() -> MutexGuard<'static, HashSet<(usize, TypeId)>> {
    static LIVE: OnceLock<Mutex<HashSet<(usize, TypeId)>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Hands an object to C.
pub(crate) fn register<T: 'static>(obj: T) -> *mut T {
    let p = Box::into_raw(Box::new(obj));
    live().insert((p as usize, TypeId::of::<T>()));
    p
}

fn check_live<T: 'static>(p: *const T, what: &'static str) -> Result<()> {
    if p.is_null() {
        return Err(Error::NullArgument(what));
    }
    if !live().contains(&(p as usize, TypeId::of::<T>())) {
        return Err(Error::InvalidHandle(what));
    }
    Ok(())
}

/// Borrows a live handle.
pub(crate) fn get<'a, T: 'static>(p: *const T, what: &'static str) -> Result<&'a T> {
    check_live(p, what)?;
    // SAFETY: registered and not yet freed.
    Ok(unsafe { &*p })
}

/// Borrows a live handle mutably (the C contract: one thread at a time).
pub(crate) fn get_mut<'a, T: 'static>(p: *mut T, what: &'static str) -> Result<&'a mut T> {
    check_live(p, what)?;
    // SAFETY: registered and not yet freed.
    Ok(unsafe { &mut *p })
}

/// Frees a handle. NULL does nothing; a handle that is not live is an error.
pub(crate) fn free<T: 'static>(p: *mut T, what: &'static str) -> Result<()> {
    if p.is_null() {
        return Ok(());
    }
    if !live().remove(&(p as usize, TypeId::of::<T>())) {
        return Err(Error::InvalidHandle(what));
    }
    // SAFETY: it was registered by `register` and is removed now, so this is
    // the one and only reclaim.
    drop(unsafe { Box::from_raw(p) });
    Ok(())
}
