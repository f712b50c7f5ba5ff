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

/// Arena sizes (the whole, the workspace) are multiples of this.
pub const ARENA_ALIGN: u64 = 2 << 20;

/// The largest arena: sizes and offsets stay far from overflow in pointer
/// arithmetic (base + offset) and in `usize`/`isize` conversions.
pub const MAX_ARENA_BYTES: u64 = 1 << 48;

const _: () = assert!(std::mem::size_of::<ArenaIpcHandle>() == 128);

impl ArenaIpcHandle {
    /// The handle's 128 bytes (native byte order: it travels between
    /// processes of one machine).
    pub fn to_bytes(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[0..8].copy_from_slice(&self.magic);
        b[8..12].copy_from_slice(&self.version.to_ne_bytes());
        b[12..16].copy_from_slice(&self.device.to_ne_bytes());
        b[16..24].copy_from_slice(&self.bytes.to_ne_bytes());
        b[24..32].copy_from_slice(&self.workspace_offset.to_ne_bytes());
        b[32..40].copy_from_slice(&self.workspace_bytes.to_ne_bytes());
        b[40..44].copy_from_slice(&self.owner_pid.to_ne_bytes());
        b[44..64].copy_from_slice(&self.reserved);
        b[64..128].copy_from_slice(&self.cuda_handle);
        b
    }

    /// Reads a handle from its 128 bytes and checks every field
    /// ([`ArenaIpcHandle::validate`]). Pure: no driver call.
    pub fn decode(b: &[u8; 128]) -> Result<ArenaIpcHandle> {
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(x)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        let mut reserved = [0u8; 20];
        reserved.copy_from_slice(&b[44..64]);
        let mut cuda_handle = [0u8; 64];
        cuda_handle.copy_from_slice(&b[64..128]);
        let h = ArenaIpcHandle {
            magic,
            version: u32_at(8),
            device: i32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            bytes: u64_at(16),
            workspace_offset: u64_at(24),
            workspace_bytes: u64_at(32),
            owner_pid: u32_at(40),
            reserved,
            cuda_handle,
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks every field against what [`Arena::export`] writes: magic and
    /// version, a device ordinal >= 0, sizes that are non-zero multiples of
    /// [`ARENA_ALIGN`] up to [`MAX_ARENA_BYTES`] with the workspace at the
    /// end, an owner pid, zero reserved bytes and a non-zero CUDA handle.
    /// (Whether the sizes fit the real allocation is checked by
    /// [`Arena::import`], against the driver.)
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid(format!("not a valid pipeswitch arena IPC handle: {why}")));
        if self.magic != IPC_MAGIC {
            return bad(format!("bad magic {:02x?}", self.magic));
        }
        if self.version != IPC_VERSION {
            return bad(format!("version {} (this library reads version {IPC_VERSION})", self.version));
        }
        if self.device < 0 {
            return bad(format!("device ordinal {}", self.device));
        }
        if self.bytes == 0 || self.bytes % ARENA_ALIGN != 0 || self.bytes > MAX_ARENA_BYTES {
            return bad(format!(
                "arena size {} is not a non-zero multiple of {ARENA_ALIGN} up to {MAX_ARENA_BYTES}",
                self.bytes
            ));
        }
        if self.workspace_bytes % ARENA_ALIGN != 0 || self.workspace_offset % ARENA_ALIGN != 0 {
            return bad(format!(
                "workspace [{}, +{}) is not {ARENA_ALIGN}-aligned",
                self.workspace_offset, self.workspace_bytes
            ));
        }
        if self.workspace_offset.checked_add(self.workspace_bytes) != Some(self.bytes) {
            return bad(format!(
                "workspace [{}, +{}) does not end the {}-byte arena",
                self.workspace_offset, self.workspace_bytes, self.bytes
            ));
        }
        if self.owner_pid == 0 || self.owner_pid > i32::MAX as u32 {
            return bad(format!("owner pid {}", self.owner_pid));
        }
        if self.reserved != [0; 20] {
            return bad("reserved bytes are not zero".into());
        }
        if self.cuda_handle == [0; 64] {
            return bad("the CUDA IPC handle is all zeros".into());
        }
        Ok(())
    }
}

/// The sizes of an arena asked for as (`bytes`, `workspace_bytes`): both
/// rounded up to [`ARENA_ALIGN`], the whole at least the workspace, at most
/// [`MAX_ARENA_BYTES`]. Pure.
pub fn arena_layout(bytes: u64, workspace_bytes: u64) -> Result<(u64, u64)> {
    if bytes == 0 || workspace_bytes > bytes {
        return Err(Error::invalid(format!(
            "arena of {bytes} bytes cannot hold a {workspace_bytes}-byte workspace"
        )));
    }
    let too_big = || {
        Error::invalid(format!("an arena of {bytes} bytes is larger than the {MAX_ARENA_BYTES} bytes an arena may have"))
    };
    let bytes_up = memory_align_up(bytes).filter(|&b| b <= MAX_ARENA_BYTES).ok_or_else(too_big)?;
    let workspace_up = memory_align_up(workspace_bytes).ok_or_else(too_big)?;
    Ok((bytes_up.max(workspace_up), workspace_up))
}

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
        let (bytes, workspace_bytes) = arena_layout(bytes, workspace_bytes)?;
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

    /// Opens an arena that another process exported. Every field of the
    /// handle is checked ([`ArenaIpcHandle::validate`]), and its sizes
    /// against the allocation the driver actually mapped: a forged or stale
    /// handle that claims more bytes is refused, never written past.
    pub fn import(handle: &ArenaIpcHandle) -> Result<Arena> {
        handle.validate()?;
        if handle.owner_pid == std::process::id() {
            return Err(Error::InvalidState(
                "an arena cannot be imported into the process that owns it (CUDA IPC forbids it); use the arena itself".into(),
            ));
        }
        let device = Device::get(handle.device)?;
        let mapping = IpcMapping::open(device, &IpcHandle(handle.cuda_handle))?;
        let base = mapping.ptr();
        let mapped = mapping.mapped_bytes()?;
        if handle.bytes > mapped {
            return Err(Error::invalid(format!(
                "arena IPC handle claims {} bytes (workspace [{}, +{})) but the allocation it maps holds {mapped}: a forged or mismatched handle",
                handle.bytes, handle.workspace_offset, handle.workspace_bytes
            )));
        }
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

    /// Moves `bytes` from arena offset `from` to `to` (`to < from`; the two
    /// ranges may overlap) on `stream`, device to device: pieces of at most
    /// `from - to` bytes in increasing order, so no piece overwrites bytes
    /// that a later piece still reads. Returns once enqueued. `stream` is an
    /// opaque driver handle (never dereferenced here).
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn move_bytes(&self, from: u64, to: u64, bytes: u64, stream: cudarc::driver::sys::CUstream) -> Result<()> {
        if to >= from {
            return Err(Error::invalid(format!("a move goes to a lower offset: {from} -> {to}")));
        }
        let src = self.check_io(from, usize::try_from(bytes).map_err(|_| Error::invalid("move too large"))?)?;
        let dst = self.check_io(to, bytes as usize)?;
        let shift = from - to;
        let mut done = 0;
        while done < bytes {
            let n = shift.min(bytes - done);
            // SAFETY: both ranges lie inside the arena (checked above); a
            // piece of at most `shift` bytes does not overlap its destination.
            unsafe { memory::copy_dtod_async(dst + done, src + done, n as usize, stream)? };
            done += n;
        }
        Ok(())
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

/// `v` rounded up to [`ARENA_ALIGN`], None if that overflows.
fn memory_align_up(v: u64) -> Option<u64> {
    v.checked_next_multiple_of(ARENA_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn good() -> ArenaIpcHandle {
        let mut cuda_handle = [0u8; 64];
        cuda_handle.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8 ^ 0x5a);
        ArenaIpcHandle {
            magic: IPC_MAGIC,
            version: IPC_VERSION,
            device: 0,
            bytes: 64 * MB,
            workspace_offset: 48 * MB,
            workspace_bytes: 16 * MB,
            owner_pid: 4242,
            reserved: [0; 20],
            cuda_handle,
        }
    }

    fn refused(h: &ArenaIpcHandle, what: &str) {
        let e = ArenaIpcHandle::decode(&h.to_bytes()).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(what)), "{what}: {e}");
        // Import refuses it before any driver call (here: no driver at all).
        let e = Arena::import(h).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(what)), "{what}: {e}");
    }

    #[test]
    fn a_handle_round_trips_through_its_bytes() {
        let h = good();
        let b = h.to_bytes();
        // The bytes are the struct's own layout (what ps_arena_export writes).
        // SAFETY: ArenaIpcHandle is 128 bytes of plain repr(C) data.
        let raw: [u8; 128] = unsafe { std::mem::transmute(h) };
        assert_eq!(b, raw);
        assert_eq!(ArenaIpcHandle::decode(&b).unwrap(), h);
        let mut no_ws = h;
        no_ws.workspace_offset = h.bytes;
        no_ws.workspace_bytes = 0;
        assert_eq!(ArenaIpcHandle::decode(&no_ws.to_bytes()).unwrap(), no_ws);
    }

    #[test]
    fn forged_handles_are_refused_field_by_field() {
        let g = good();
        let forge = |f: &dyn Fn(&mut ArenaIpcHandle)| {
            let mut h = g;
            f(&mut h);
            h
        };
        refused(&forge(&|h| h.magic[3] ^= 1), "magic");
        refused(&forge(&|h| h.version = 2), "version");
        refused(&forge(&|h| h.device = -1), "device");
        refused(&forge(&|h| h.device = i32::MIN), "device");
        refused(&forge(&|h| h.bytes = 0), "arena size");
        refused(&forge(&|h| h.bytes += 1), "arena size");
        refused(&forge(&|h| {
            h.bytes = u64::MAX - (u64::MAX % ARENA_ALIGN);
            h.workspace_offset = h.bytes - 16 * MB;
        }), "arena size");
        refused(&forge(&|h| {
            h.bytes = MAX_ARENA_BYTES + ARENA_ALIGN;
            h.workspace_offset = h.bytes - 16 * MB;
        }), "arena size");
        refused(&forge(&|h| h.workspace_offset += 256), "aligned");
        refused(&forge(&|h| h.workspace_bytes += 1), "aligned");
        refused(&forge(&|h| h.workspace_offset -= ARENA_ALIGN), "does not end");
        refused(&forge(&|h| h.workspace_bytes = 32 * MB), "does not end");
        refused(&forge(&|h| {
            // Offset + bytes wraps around to the arena's size.
            h.workspace_offset = u64::MAX - (u64::MAX % ARENA_ALIGN);
            h.workspace_bytes = h.bytes.wrapping_sub(h.workspace_offset);
        }), "does not end");
        refused(&forge(&|h| h.owner_pid = 0), "owner pid");
        refused(&forge(&|h| h.owner_pid = u32::MAX), "owner pid");
        refused(&forge(&|h| h.reserved[19] = 1), "reserved");
        refused(&forge(&|h| h.cuda_handle = [0; 64]), "CUDA IPC handle");
    }

    #[test]
    fn garbage_handles_are_refused() {
        assert!(ArenaIpcHandle::decode(&[0; 128]).is_err());
        assert!(ArenaIpcHandle::decode(&[0xff; 128]).is_err());
        let mut s: u64 = 0x1234_5678_9abc_def1;
        let mut b = [0u8; 128];
        for i in 0..2000 {
            for x in b.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *x = s as u8;
            }
            if i % 2 == 1 {
                // Random bytes behind a valid magic and version.
                b[..12].copy_from_slice(&good().to_bytes()[..12]);
            }
            assert!(matches!(ArenaIpcHandle::decode(&b), Err(Error::InvalidArgument(_))), "{b:?}");
        }
    }

    #[test]
    fn arena_sizes_never_overflow() {
        assert_eq!(arena_layout(1, 0).unwrap(), (2 * MB, 0));
        assert_eq!(arena_layout(3 * MB, 1).unwrap(), (4 * MB, 2 * MB));
        assert_eq!(arena_layout(2 * MB + 1, 2 * MB + 1).unwrap(), (4 * MB, 4 * MB));
        assert_eq!(arena_layout(MAX_ARENA_BYTES, 0).unwrap(), (MAX_ARENA_BYTES, 0));
        for (b, w) in [
            (0, 0),
            (1, 2),
            (u64::MAX, 0),
            (u64::MAX, u64::MAX),
            (u64::MAX - 1, 1),
            (u64::MAX - ARENA_ALIGN, 0),
            (MAX_ARENA_BYTES + 1, 0),
        ] {
            assert!(matches!(arena_layout(b, w), Err(Error::InvalidArgument(_))), "{b} {w}");
            // Refused before the driver is asked for anything.
            assert!(matches!(Arena::create(0, b, w), Err(Error::InvalidArgument(_))), "{b} {w}");
        }
        assert_eq!(memory_align_up(u64::MAX), None);
        assert_eq!(memory_align_up(0), Some(0));
        assert_eq!(memory_align_up(ARENA_ALIGN + 1), Some(2 * ARENA_ALIGN));
    }
}
