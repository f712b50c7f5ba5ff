//! The device arena: one plain `cuMemAlloc` allocation per device, carved by
//! an offset allocator into model regions, with a workspace region at its end
//! for activations. The owning process (later: the memory daemon) exports it
//! with a CUDA IPC handle; workers import it once and then address everything
//! by offset: no allocation and no IPC call per switch.

pub mod allocator;
pub mod workspace;

use cudarc::driver::sys::CUdeviceptr;
use std::sync::Mutex;

use crate::cuda::{memory, Device, DeviceAlloc, IpcHandle, IpcMapping};
use crate::error::{Error, Result};
use allocator::OffsetAllocator;

/// Alignment of model regions (and tensors inside them).
pub const REGION_ALIGN: u64 = 256;

/// Everything a process needs to import an arena: 128 bytes, plain data, so
/// it can travel over any channel (a socket, shared memory, a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ArenaIpcHandle {
    pub magic: [u8; 8],
    pub version: u32,
    pub device: i32,
    pub bytes: u64,
    pub workspace_offset: u64,
    pub workspace_bytes: u64,
    pub owner_pid: u32,
    pub reserved: [u8; 20],
    pub cuda_handle: [u8; 64],
}

const IPC_MAGIC: [u8; 8] = *b"PSARENA\0";
const IPC_VERSION: u32 = 1;

#[derive(Debug)]
enum Memory {
    Owned(DeviceAlloc),
    /// Held for its Drop, which closes the IPC mapping.
    Imported(#[allow(dead_code)] IpcMapping),
}

/// A device arena, owned (allocated here) or imported from another process.
#[derive(Debug)]
pub struct Arena {
    device: &'static Device,
    memory: Memory,
    base: CUdeviceptr,
    bytes: u64,
    workspace_offset: u64,
    workspace_bytes: u64,
    /// Model regions; only the owner allocates.
    regions: Mutex<OffsetAllocator>,
}

impl Arena {
    /// Allocates an arena of `bytes` on device `ordinal`, the last
    /// `workspace_bytes` of it reserved as the workspace.
    pub fn create(ordinal: i32, bytes: u64, workspace_bytes: u64) -> Result<Arena> {
        if bytes == 0 || workspace_bytes > bytes {
            return Err(Error::invalid(format!(
                "arena of {bytes} bytes cannot hold a {workspace_bytes}-byte workspace"
            )));
        }
        let workspace_bytes = memory_align_up(workspace_bytes);
        let bytes = memory_align_up(bytes).max(workspace_bytes);
        let device = Device::get(ordinal)?;
        let alloc = DeviceAlloc::new(device, bytes as usize).map_err(|e| match e {
            Error::Cuda(c) if c.is_out_of_memory() => Error::ArenaFull(format!(
                "the device has no {bytes} bytes free for an arena ({c})"
            )),
            e => e,
        })?;
        let base = alloc.ptr();
        let model_bytes = bytes - workspace_bytes;
        Ok(Arena {
            device,
            memory: Memory::Owned(alloc),
            base,
            bytes,
            workspace_offset: model_bytes,
            workspace_bytes,
            regions: Mutex::new(OffsetAllocator::new(model_bytes)),
        })
    }

    /// Opens an arena that another process exported.
    pub fn import(handle: &ArenaIpcHandle) -> Result<Arena> {
        if handle.magic != IPC_MAGIC || handle.version != IPC_VERSION {
            return Err(Error::invalid("not a pipeswitch arena IPC handle (bad magic or version)"));
        }
        if handle.workspace_offset.checked_add(handle.workspace_bytes) != Some(handle.bytes) {
            return Err(Error::invalid("arena IPC handle has inconsistent sizes"));
        }
        if handle.owner_pid == std::process::id() {
            return Err(Error::InvalidState(
                "an arena cannot be imported into the process that owns it (CUDA IPC forbids it); use the arena itself".into(),
            ));
        }
        let device = Device::get(handle.device)?;
        let mapping = IpcMapping::open(device, &IpcHandle(handle.cuda_handle))?;
        let base = mapping.ptr();
        Ok(Arena {
            device,
            memory: Memory::Imported(mapping),
            base,
            bytes: handle.bytes,
            workspace_offset: handle.workspace_offset,
            workspace_bytes: handle.workspace_bytes,
            regions: Mutex::new(OffsetAllocator::new(0)),
        })
    }

    /// The handle another process passes to [`Arena::import`].
    pub fn export(&self) -> Result<ArenaIpcHandle> {
        let Memory::Owned(alloc) = &self.memory else {
            return Err(Error::InvalidState("only the arena's owner can export it".into()));
        };
        let h = alloc.ipc_handle()?;
        Ok(ArenaIpcHandle {
            magic: IPC_MAGIC,
            version: IPC_VERSION,
            device: self.device.ordinal(),
            bytes: self.bytes,
            workspace_offset: self.workspace_offset,
            workspace_bytes: self.workspace_bytes,
            owner_pid: std::process::id(),
            reserved: [0; 20],
            cuda_handle: h.0,
        })
    }

    pub fn device(&self) -> &'static Device {
        self.device
    }
    pub fn base(&self) -> CUdeviceptr {
        self.base
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn is_owner(&self) -> bool {
        matches!(self.memory, Memory::Owned(_))
    }
    /// (offset, bytes) of the workspace region.
    pub fn workspace(&self) -> (u64, u64) {
        (self.workspace_offset, self.workspace_bytes)
    }

    fn regions(&self) -> std::sync::MutexGuard<'_, OffsetAllocator> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a model region of `bytes`; returns its offset.
    pub fn alloc(&self, bytes: u64) -> Result<u64> {
        if !self.is_owner() {
            return Err(Error::InvalidState(
                "regions of an imported arena are allocated by its owner".into(),
            ));
        }
        self.regions().alloc(bytes, REGION_ALIGN)
    }

    /// Releases the region that starts at `offset`.
    pub fn release(&self, offset: u64) -> Result<()> {
        if !self.is_owner() {
            return Err(Error::InvalidState(
                "regions of an imported arena are released by its owner".into(),
            ));
        }
        self.regions().release(offset).map(|_| ())
    }

    /// (used, largest free) bytes of the model part.
    pub fn region_usage(&self) -> (u64, u64) {
        let r = self.regions();
        (r.used_bytes(), r.largest_free())
    }

    /// Checks that `[offset, offset+bytes)` may receive a model: inside the
    /// arena, 256-aligned, outside the workspace, and (in the owner) inside
    /// one allocated region.
    pub fn check_region(&self, offset: u64, bytes: u64) -> Result<()> {
        let end = offset.checked_add(bytes).ok_or_else(|| Error::invalid("region overflows"))?;
        if offset % REGION_ALIGN != 0 {
            return Err(Error::invalid(format!("arena offset {offset} is not {REGION_ALIGN}-aligned")));
        }
        if end > self.workspace_offset {
            return Err(Error::ArenaFull(format!(
                "{bytes} bytes at offset {offset} do not fit the arena's {} bytes of model space",
                self.workspace_offset
            )));
        }
        if self.is_owner() && !self.regions().contains(offset, bytes) {
            return Err(Error::invalid(format!(
                "[{offset}, {end}) is not inside one region allocated from this arena"
            )));
        }
        Ok(())
    }

    fn check_io(&self, offset: u64, bytes: usize) -> Result<CUdeviceptr> {
        match offset.checked_add(bytes as u64) {
            Some(end) if end <= self.bytes => Ok(self.base + offset),
            _ => Err(Error::invalid(format!(
                "[{offset}, +{bytes}) lies outside the arena's {} bytes",
                self.bytes
            ))),
        }
    }

    /// Copies device bytes at `offset` to `out` (synchronous; for checks and tests).
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let src = self.check_io(offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: range checked against the arena; out is writable.
        unsafe { memory::copy_dtoh(out.as_mut_ptr(), src, out.len()) }
    }

    /// Copies `data` to the arena at `offset` (synchronous).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let dst = self.check_io(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: range checked against the arena.
        unsafe { memory::copy_htod(dst, data.as_ptr(), data.len()) }
    }

    /// Fills `[offset, offset+bytes)` with `value` (synchronous).
    pub fn fill(&self, offset: u64, bytes: u64, value: u8) -> Result<()> {
        let dst = self.check_io(offset, bytes as usize)?;
        self.device.bind()?;
        // SAFETY: range checked against the arena.
        unsafe { memory::memset_d8(dst, value, bytes as usize)? };
        // cuMemsetD8 may return before the fill is done.
        crate::cuda::stream::synchronize_legacy()
    }
}

fn memory_align_up(v: u64) -> u64 {
    const A: u64 = 2 << 20;
    v.div_ceil(A) * A
}
