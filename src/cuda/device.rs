//! Devices and their primary contexts.
//!
//! libpipeswitch always works in the device's *primary* context, the one that
//! the CUDA runtime, PyTorch, CuPy and TensorRT use: device pointers, streams
//! and events created here are valid in theirs, in the same process. Each
//! device's primary context is retained once per process and kept for the
//! life of the process (as the runtime does).

use cudarc::driver::sys::{CUcontext, CUdevice, CUdevice_attribute};
use std::ffi::c_char;
use std::sync::{Mutex, OnceLock};

use crate::cu;
use crate::error::{Error, Result};

use super::result::driver;

/// A CUDA device with its retained primary context.
#[derive(Debug)]
pub struct Device {
    ordinal: i32,
    dev: CUdevice,
    ctx: CUcontext,
}

// SAFETY: a CUcontext handle may be used from any thread (it is made current
// per thread with cuCtxSetCurrent before use).
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// The device with this ordinal, its primary context retained (once per
    /// process). Errors: no driver, no such device.
    pub fn get(ordinal: i32) -> Result<&'static Device> {
        driver()?;
        static DEVICES: OnceLock<Mutex<Vec<&'static Device>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(Vec::new()));
        let mut list = devices
            .lock()
            .map_err(|_| Error::Internal("device registry lock poisoned".into()))?;
        if let Some(d) = list.iter().find(|d| d.ordinal == ordinal) {
            d.bind()?;
            return Ok(d);
        }
        let count = Self::count()?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::invalid(format!(
                "device ordinal {ordinal} out of range: this machine has {count} CUDA device(s)"
            )));
        }
        let mut dev: CUdevice = 0;
        cu!(cuDeviceGet(&mut dev, ordinal))?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        cu!(cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
        let device: &'static Device = Box::leak(Box::new(Device { ordinal, dev, ctx }));
        device.bind()?;
        list.push(device);
        Ok(device)
    }

    /// Number of CUDA devices.
    pub fn count() -> Result<i32> {
        driver()?;
        let mut n = 0;
        cu!(cuDeviceGetCount(&mut n))?;
        Ok(n)
    }

    /// Makes this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        cu!(cuCtxSetCurrent(self.ctx))?;
        Ok(())
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        let mut buf = [0 as c_char; 256];
        cu!(cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, self.dev))?;
        // SAFETY: the driver writes a NUL-terminated string into buf.
        let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        Ok(s.to_string_lossy().into_owned())
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<u64> {
        let mut bytes = 0usize;
        cu!(cuDeviceTotalMem_v2(&mut bytes, self.dev))?;
        Ok(bytes as u64)
    }

    /// Free and total device memory in bytes, as the driver reports it now.
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        cu!(cuMemGetInfo_v2(&mut free, &mut total))?;
        Ok((free as u64, total as u64))
    }

    /// A device attribute (e.g. multiprocessor count).
    pub fn attribute(&self, attr: CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        cu!(cuDeviceGetAttribute(&mut v, attr, self.dev))?;
        Ok(v)
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((
            self.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            self.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    /// Waits for all work on the device (primary context) to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        cu!(cuCtxSynchronize())?;
        Ok(())
    }
}
