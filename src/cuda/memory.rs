//! Device and host memory: RAII types over the driver's allocation,
//! registration and IPC calls, plus the copy primitives the switch uses.

use cudarc::driver::sys::{CUdeviceptr, CUipcMemHandle, CUipcMem_flags, CUstream};
use std::ffi::c_void;

use super::Device;
use crate::cu;
use crate::error::{Error, Result};

/// One plain `cuMemAlloc` allocation (never pool memory: legacy CUDA IPC
/// handles do not cover memory from `cuMemAllocAsync` pools).
#[derive(Debug)]
pub struct DeviceAlloc {
    device: &'static Device,
    ptr: CUdeviceptr,
    bytes: usize,
}

impl DeviceAlloc {
    pub fn new(device: &'static Device, bytes: usize) -> Result<DeviceAlloc> {
        if bytes == 0 {
            return Err(Error::invalid("a device allocation needs at least one byte"));
        }
        device.bind()?;
        let mut ptr: CUdeviceptr = 0;
        cu!(cuMemAlloc_v2(&mut ptr, bytes))?;
        Ok(DeviceAlloc { device, ptr, bytes })
    }
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn device(&self) -> &'static Device {
        self.device
    }
    /// A new allocation holding a copy of `data` (synchronous).
    pub fn from_slice<T: Copy>(device: &'static Device, data: &[T]) -> Result<DeviceAlloc> {
        let bytes = std::mem::size_of_val(data);
        let a = DeviceAlloc::new(device, bytes.max(1))?;
        if bytes > 0 {
            // SAFETY: a holds at least `bytes`; data is plain Copy data.
            unsafe { copy_htod(a.ptr, data.as_ptr().cast(), bytes)? };
        }
        Ok(a)
    }

    /// Copies the first `size_of_val(out)` bytes to `out` (synchronous).
    pub fn copy_to_slice<T: Copy>(&self, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.bytes {
            return Err(Error::invalid(format!("reading {bytes} bytes from a {}-byte allocation", self.bytes)));
        }
        self.device.bind()?;
        // SAFETY: both ranges hold `bytes`; T is plain Copy data.
        unsafe { copy_dtoh(out.as_mut_ptr().cast(), self.ptr, bytes) }
    }

    /// Fills the allocation with `value` bytes and waits for it.
    pub fn fill(&self, value: u8) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the whole allocation.
        unsafe { memset_d8(self.ptr, value, self.bytes)? };
        super::stream::synchronize_legacy()
    }

    /// A handle another process can open with [`IpcMapping::open`].
    pub fn ipc_handle(&self) -> Result<IpcHandle> {
        self.device.bind()?;
        let mut h = CUipcMemHandle { reserved: [0; 64] };
        cu!(cuIpcGetMemHandle(&mut h, self.ptr))?;
        Ok(IpcHandle(h.reserved.map(|c| c as u8)))
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuMemFree_v2(self.ptr))?));
        if let Err(e) = r {
            tracing::warn!("freeing device memory failed: {e}");
        }
    }
}

/// The 64 opaque bytes of a `CUipcMemHandle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle(pub [u8; 64]);

/// Device memory of another process, opened from its IPC handle.
#[derive(Debug)]
pub struct IpcMapping {
    device: &'static Device,
    ptr: CUdeviceptr,
}

impl IpcMapping {
    pub fn open(device: &'static Device, handle: &IpcHandle) -> Result<IpcMapping> {
        device.bind()?;
        let h = CUipcMemHandle { reserved: handle.0.map(|b| b as std::ffi::c_char) };
        let mut ptr: CUdeviceptr = 0;
        cu!(cuIpcOpenMemHandle_v2(
            &mut ptr,
            h,
            CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32
        ))?;
        Ok(IpcMapping { device, ptr })
    }
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Bytes of the mapped allocation from [`IpcMapping::ptr`] on, as the
    /// driver knows it (not as the sender claims).
    pub fn mapped_bytes(&self) -> Result<u64> {
        self.device.bind()?;
        let (base, size) = address_range(self.ptr)?;
        Ok((base + size as u64).saturating_sub(self.ptr))
    }
}

/// The allocation that holds device address `ptr`: (its base, its size in
/// bytes), from `cuMemGetAddressRange` (current context).
pub fn address_range(ptr: CUdeviceptr) -> Result<(CUdeviceptr, usize)> {
    let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
    cu!(cuMemGetAddressRange_v2(&mut base, &mut size, ptr))?;
    Ok((base, size))
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuIpcCloseMemHandle(self.ptr))?));
        if let Err(e) = r {
            tracing::warn!("closing an IPC memory mapping failed: {e}");
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc` (portable across contexts).
#[derive(Debug)]
pub struct PinnedHost {
    device: &'static Device,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    pub fn new(device: &'static Device, bytes: usize) -> Result<PinnedHost> {
        if bytes == 0 {
            return Err(Error::invalid("a pinned allocation needs at least one byte"));
        }
        device.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        cu!(cuMemHostAlloc(&mut p, bytes, cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE))?;
        Ok(PinnedHost { device, ptr: p.cast(), bytes })
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to bytes bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuMemFreeHost(self.ptr.cast()))?));
        if let Err(e) = r {
            tracing::warn!("freeing pinned host memory failed: {e}");
        }
    }
}

/// Host memory that this process page-locked with `cuMemHostRegister`
/// (PORTABLE: usable from every context; DEVICEMAP: kernels may read it
/// directly over PCIe). Unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration {
    device: &'static Device,
    ptr: *mut u8,
    bytes: usize,
    /// The range's address for kernels.
    device_ptr: CUdeviceptr,
}

// SAFETY: the registration only records the address; the memory is owned elsewhere.
unsafe impl Send for HostRegistration {}
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// # Safety
    /// `ptr..ptr+bytes` must be a mapped, page-aligned host range that stays
    /// mapped until the registration is dropped.
    pub unsafe fn new(device: &'static Device, ptr: *mut u8, bytes: usize) -> Result<Self> {
        device.bind()?;
        cu!(cuMemHostRegister_v2(
            ptr.cast(),
            bytes,
            cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE | cudarc::driver::sys::CU_MEMHOSTREGISTER_DEVICEMAP
        ))?;
        let mut device_ptr: CUdeviceptr = 0;
        if let Err(e) = cu!(cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr.cast(), 0)) {
            let _ = cu!(cuMemHostUnregister(ptr.cast()));
            return Err(e.into());
        }
        Ok(HostRegistration { device, ptr, bytes, device_ptr })
    }

    /// Page-locks a range this process may only read (a read-only mapping
    /// of someone else's shared memory, e.g. a client's input area), for
    /// copies from it (PORTABLE | READ_ONLY; no device address for kernels).
    ///
    /// # Safety
    /// As [`HostRegistration::new`].
    pub unsafe fn new_read_only(device: &'static Device, ptr: *const u8, bytes: usize) -> Result<Self> {
        device.bind()?;
        cu!(cuMemHostRegister_v2(
            ptr.cast_mut().cast(),
            bytes,
            cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE | cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY
        ))?;
        Ok(HostRegistration { device, ptr: ptr.cast_mut(), bytes, device_ptr: 0 })
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The address kernels use to read `ptr + offset` over PCIe.
    pub fn device_ptr(&self, offset: usize) -> Result<CUdeviceptr> {
        if self.device_ptr == 0 {
            return Err(crate::error::Error::invalid("a read-only registration has no device address"));
        }
        if offset > self.bytes {
            return Err(crate::error::Error::invalid(format!("offset {offset} outside {} registered bytes", self.bytes)));
        }
        Ok(self.device_ptr + offset as u64)
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuMemHostUnregister(self.ptr.cast()))?));
        if let Err(e) = r {
            tracing::warn!("unregistering host memory failed: {e}");
        }
    }
}

/// Enqueues a host-to-device copy on `stream`.
///
/// # Safety
/// `src..src+bytes` must stay valid (and, for an asynchronous copy, pinned)
/// until the copy completes; `dst..dst+bytes` must be device memory.
pub unsafe fn copy_htod_async(
    dst: CUdeviceptr,
    src: *const u8,
    bytes: usize,
    stream: CUstream,
) -> Result<()> {
    cu!(cuMemcpyHtoDAsync_v2(dst, src.cast(), bytes, stream))?;
    Ok(())
}

/// Synchronous host-to-device copy: returns once the bytes are in device
/// memory. (`cuMemcpyHtoD` alone may return before the DMA from its staging
/// buffer has finished, and kernels on non-blocking streams do not wait for
/// the legacy stream, so it waits for the legacy stream too.)
///
/// # Safety
/// As for [`copy_htod_async`].
pub unsafe fn copy_htod(dst: CUdeviceptr, src: *const u8, bytes: usize) -> Result<()> {
    cu!(cuMemcpyHtoD_v2(dst, src.cast(), bytes))?;
    crate::cuda::stream::synchronize_legacy()
}

/// Synchronous device-to-host copy.
///
/// # Safety
/// `dst..dst+bytes` must be writable host memory; `src..src+bytes` device memory.
pub unsafe fn copy_dtoh(dst: *mut u8, src: CUdeviceptr, bytes: usize) -> Result<()> {
    cu!(cuMemcpyDtoH_v2(dst.cast(), src, bytes))?;
    Ok(())
}

/// Synchronous byte fill of device memory.
///
/// # Safety
/// `dst..dst+bytes` must be device memory.
pub unsafe fn memset_d8(dst: CUdeviceptr, value: u8, bytes: usize) -> Result<()> {
    cu!(cuMemsetD8_v2(dst, value, bytes))?;
    // cuMemsetD8 is asynchronous for device memory: wait, so that work on
    // non-blocking streams sees the bytes.
    crate::cuda::stream::synchronize_legacy()
}

/// Enqueues a device-to-device copy on `stream`.
///
/// # Safety
/// Both ranges must be device memory that stays valid until the copy completes.
pub unsafe fn copy_dtod_async(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream) -> Result<()> {
    cu!(cuMemcpyDtoDAsync_v2(dst, src, bytes, stream))?;
    Ok(())
}
