//! `ps_arena_*`: the device arena.

use std::ffi::c_void;
use std::sync::Arc;

use super::{boundary, handles, out, ps_status, slice_arg};
use crate::arena::{Arena, ArenaIpcHandle};
use crate::error::{Error, Result};

/// A device arena (owned, or imported from another process). Thread-safe.
pub struct ps_arena {
    pub(crate) inner: Arc<Arena>,
}

/// What another process needs to import an arena (`ps_arena_import`). Plain
/// bytes: send it over any channel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ps_arena_ipc_handle {
    pub bytes: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<ArenaIpcHandle>() == 128);

/// The arena of a live handle, held for one call (a free meanwhile waits for it).
pub(crate) fn arena_ref(p: *const ps_arena) -> Result<Arc<Arena>> {
    Ok(handles::get(p, "arena")?.inner.clone())
}

/// Allocates an arena of `bytes` on `device` (one cuMemAlloc), the last
/// `workspace_bytes` of it reserved as the workspace. Sizes round up to 2 MiB.
#[no_mangle]
pub extern "C" fn ps_arena_create(
    device: i32,
    bytes: u64,
    workspace_bytes: u64,
    arena_out: *mut *mut ps_arena,
) -> ps_status {
    boundary("ps_arena_create", || {
        let o = out(arena_out, "arena_out")?;
        let a = Arena::create(device, bytes, workspace_bytes)?;
        o.write(handles::register(ps_arena { inner: Arc::new(a) }));
        Ok(())
    })
}

/// Releases the arena (its device memory once no switch uses it). NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_arena_free(arena: *mut ps_arena) -> ps_status {
    boundary("ps_arena_free", || handles::free(arena, "arena"))
}

/// Reserves a model region of `bytes` (256-aligned); returns its offset.
#[no_mangle]
pub extern "C" fn ps_arena_alloc(arena: *const ps_arena, bytes: u64, offset_out: *mut u64) -> ps_status {
    boundary("ps_arena_alloc", || {
        let a = arena_ref(arena)?;
        let o = out(offset_out, "offset_out")?;
        o.write(a.alloc(bytes)?);
        Ok(())
    })
}

/// Releases the region that starts at `offset`.
#[no_mangle]
pub extern "C" fn ps_arena_release(arena: *const ps_arena, offset: u64) -> ps_status {
    boundary("ps_arena_release", || arena_ref(arena)?.release(offset))
}

/// The arena's device base address (a CUdeviceptr) and size in bytes.
#[no_mangle]
pub extern "C" fn ps_arena_base(arena: *const ps_arena, base_out: *mut u64, bytes_out: *mut u64) -> ps_status {
    boundary("ps_arena_base", || {
        let a = arena_ref(arena)?;
        let (b, n) = (out(base_out, "base_out")?, out(bytes_out, "bytes_out")?);
        b.write(a.base());
        n.write(a.bytes());
        Ok(())
    })
}

/// The workspace region: offset from the base, and size.
#[no_mangle]
pub extern "C" fn ps_arena_workspace(arena: *const ps_arena, offset_out: *mut u64, bytes_out: *mut u64) -> ps_status {
    boundary("ps_arena_workspace", || {
        let a = arena_ref(arena)?;
        let (o, n) = (out(offset_out, "offset_out")?, out(bytes_out, "bytes_out")?);
        let (off, bytes) = a.workspace();
        o.write(off);
        n.write(bytes);
        Ok(())
    })
}

/// Exports an owned arena for other processes (CUDA IPC).
#[no_mangle]
pub extern "C" fn ps_arena_export(arena: *const ps_arena, handle_out: *mut ps_arena_ipc_handle) -> ps_status {
    boundary("ps_arena_export", || {
        let a = arena_ref(arena)?;
        let o = out(handle_out, "handle_out")?;
        let h = a.export()?;
        let mut bytes = [0u8; 128];
        // SAFETY: ArenaIpcHandle is 128 bytes of plain repr(C) data.
        unsafe { std::ptr::copy_nonoverlapping((&h as *const ArenaIpcHandle).cast::<u8>(), bytes.as_mut_ptr(), 128) };
        o.write(ps_arena_ipc_handle { bytes });
        Ok(())
    })
}

/// Imports an arena that another process exported. Regions of an imported
/// arena are allocated by its owner; this process addresses them by offset.
#[no_mangle]
pub extern "C" fn ps_arena_import(handle: *const ps_arena_ipc_handle, arena_out: *mut *mut ps_arena) -> ps_status {
    boundary("ps_arena_import", || {
        if handle.is_null() {
            return Err(Error::NullArgument("handle"));
        }
        let o = out(arena_out, "arena_out")?;
        // SAFETY: non-NULL; every bit pattern is a valid ArenaIpcHandle (checked by import).
        let h: ArenaIpcHandle = unsafe { std::ptr::read_unaligned(handle.cast::<ArenaIpcHandle>()) };
        let a = Arena::import(&h)?;
        o.write(handles::register(ps_arena { inner: Arc::new(a) }));
        Ok(())
    })
}

/// Copies `bytes` from the arena at `offset` to host memory (synchronous).
#[no_mangle]
pub extern "C" fn ps_arena_read(arena: *const ps_arena, offset: u64, dst: *mut c_void, bytes: usize) -> ps_status {
    boundary("ps_arena_read", || {
        let a = arena_ref(arena)?;
        if bytes == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::NullArgument("dst"));
        }
        // SAFETY: the caller passes `bytes` writable bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), bytes) };
        a.read(offset, buf)
    })
}

/// Copies `bytes` of host memory into the arena at `offset` (synchronous).
#[no_mangle]
pub extern "C" fn ps_arena_write(arena: *const ps_arena, offset: u64, src: *const c_void, bytes: usize) -> ps_status {
    boundary("ps_arena_write", || {
        let a = arena_ref(arena)?;
        a.write(offset, slice_arg(src.cast::<u8>(), bytes, "src")?)
    })
}
