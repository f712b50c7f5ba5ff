//! The process's workspace allocator: activations and temporaries come from
//! the arena's workspace region, so every model (and, one active at a time,
//! every worker) shares one workspace and no switch calls `cuMemAlloc`.
//! Its malloc/free pair has the signatures of PyTorch's
//! `CUDAPluggableAllocator` (see `ps_workspace_malloc`).

use std::sync::{Arc, Mutex, MutexGuard};

use super::allocator::OffsetAllocator;
use super::Arena;
use crate::error::{Error, Result};

/// Alignment of workspace allocations (PyTorch's is 512 bytes).
pub const WORKSPACE_ALIGN: u64 = 512;

struct Attached {
    arena: Arc<Arena>,
    alloc: OffsetAllocator,
}

static WORKSPACE: Mutex<Option<Attached>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<Attached>> {
    WORKSPACE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves workspace allocations from `arena`'s workspace region. Fails if
/// another arena is attached with allocations still live.
pub fn attach(arena: &Arc<Arena>) -> Result<()> {
    let mut s = state();
    if let Some(a) = s.as_ref() {
        if Arc::ptr_eq(&a.arena, arena) {
            return Ok(());
        }
        if a.alloc.used_bytes() > 0 {
            return Err(Error::InvalidState(format!(
                "the workspace of another arena still has {} bytes allocated",
                a.alloc.used_bytes()
            )));
        }
    }
    let (_, bytes) = arena.workspace();
    if bytes == 0 {
        return Err(Error::invalid("the arena has no workspace region"));
    }
    *s = Some(Attached { arena: arena.clone(), alloc: OffsetAllocator::new(bytes) });
    Ok(())
}

/// Stops serving from the attached arena (which must have no live allocations).
pub fn detach() -> Result<()> {
    let mut s = state();
    if let Some(a) = s.as_ref() {
        if a.alloc.used_bytes() > 0 {
            return Err(Error::InvalidState(format!(
                "{} workspace bytes are still allocated",
                a.alloc.used_bytes()
            )));
        }
    }
    *s = None;
    Ok(())
}

/// A device pointer to `bytes` of workspace on `device`.
pub fn malloc(bytes: u64, device: i32) -> Result<u64> {
    let mut s = state();
    let a = s.as_mut().ok_or_else(|| Error::InvalidState("no arena is attached to the workspace".into()))?;
    if a.arena.device().ordinal() != device {
        return Err(Error::invalid(format!(
            "workspace is on device {} but device {device} was asked for",
            a.arena.device().ordinal()
        )));
    }
    let off = a.alloc.alloc(bytes.max(1), WORKSPACE_ALIGN).map_err(|e| match e {
        Error::ArenaFull(m) => Error::ArenaFull(format!("workspace: {m}")),
        e => e,
    })?;
    // Inside the arena (off < workspace bytes), so this cannot overflow for
    // a real allocation; checked all the same.
    a.arena
        .base()
        .checked_add(a.arena.workspace().0)
        .and_then(|w| w.checked_add(off))
        .ok_or_else(|| Error::Internal(format!("workspace offset {off} overflows the address space")))
}

/// Returns a pointer from [`malloc`].
pub fn free(ptr: u64) -> Result<()> {
    let mut s = state();
    let a = s.as_mut().ok_or_else(|| Error::InvalidState("no arena is attached to the workspace".into()))?;
    let base = a.arena.base().saturating_add(a.arena.workspace().0);
    let off = ptr
        .checked_sub(base)
        .ok_or_else(|| Error::invalid(format!("{ptr:#x} is not a workspace pointer")))?;
    a.alloc.release(off).map(|_| ())
}

/// (used, largest free) bytes of the workspace, or None when detached.
pub fn usage() -> Option<(u64, u64)> {
    state().as_ref().map(|a| (a.alloc.used_bytes(), a.alloc.largest_free()))
}
