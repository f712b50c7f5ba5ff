//! `ps_workspace_*`: the shared workspace allocator, whose malloc/free pair
//! plugs into PyTorch as `torch.cuda.memory.CUDAPluggableAllocator(
//! "libpipeswitch.so", "ps_workspace_malloc", "ps_workspace_free")`.

use std::ffi::c_void;

use super::arena::{arena_ref, ps_arena};
use super::{boundary, out, ps_status};
use crate::arena::workspace;

/// Serves workspace allocations from `arena`'s workspace region (process-wide).
#[no_mangle]
pub extern "C" fn ps_workspace_attach(arena: *const ps_arena) -> ps_status {
    boundary("ps_workspace_attach", || workspace::attach(&arena_ref(arena)?))
}

/// Detaches the workspace (no allocation may be live).
#[no_mangle]
pub extern "C" fn ps_workspace_detach() -> ps_status {
    boundary("ps_workspace_detach", workspace::detach)
}

/// Allocates `size` bytes of workspace on `device`; NULL when the workspace
/// is full or not attached (then `ps_last_error_message()` says why). The
/// stream is unused: allocations are stream-ordered by their users.
#[no_mangle]
pub extern "C" fn ps_workspace_malloc(size: usize, device: i32, stream: *mut c_void) -> *mut c_void {
    let _ = stream;
    let mut ptr = 0u64;
    let st = boundary("ps_workspace_malloc", || {
        ptr = workspace::malloc(size as u64, device)?;
        Ok(())
    });
    if st == super::PS_OK {
        ptr as *mut c_void
    } else {
        std::ptr::null_mut()
    }
}

/// Frees a pointer from `ps_workspace_malloc`. NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_workspace_free(ptr: *mut c_void, size: usize, device: i32, stream: *mut c_void) {
    let _ = (size, device, stream);
    if ptr.is_null() {
        return;
    }
    let _ = boundary("ps_workspace_free", || workspace::free(ptr as u64));
}

/// Bytes in use and the largest free piece of the workspace.
#[no_mangle]
pub extern "C" fn ps_workspace_usage(used_out: *mut u64, largest_free_out: *mut u64) -> ps_status {
    boundary("ps_workspace_usage", || {
        let (u, l) = (out(used_out, "used_out")?, out(largest_free_out, "largest_free_out")?);
        let (used, free) = workspace::usage()
            .ok_or_else(|| crate::error::Error::InvalidState("no arena is attached to the workspace".into()))?;
        u.write(used);
        l.write(free);
        Ok(())
    })
}
