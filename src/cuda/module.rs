//! PTX modules: loaded with `cuModuleLoadDataEx` and the JIT's error and info
//! log buffers, so that a bad kernel reports the JIT's own message.

use cudarc::driver::sys::{CUfunction, CUjit_option, CUmodule};
use std::ffi::{c_void, CString};

use super::Device;
use crate::cu;
use crate::error::{Error, Result};

/// A loaded module of one device's primary context.
#[derive(Debug)]
pub struct Module {
    device: &'static Device,
    raw: CUmodule,
    name: String,
    /// What the JIT said while compiling (warnings, resource usage).
    pub info_log: String,
}

// SAFETY: module handles may be used from any thread of the process.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// A kernel of a loaded module. Valid while its module lives.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    pub raw: CUfunction,
}

// SAFETY: function handles may be used from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

const LOG_BYTES: usize = 16 * 1024;

impl Module {
    /// JIT-compiles PTX text. `name` names the module in errors.
    pub fn load_ptx(device: &'static Device, name: &str, ptx: &str) -> Result<Module> {
        device.bind()?;
        let image = CString::new(ptx).map_err(|_| Error::Ptx {
            module: name.into(),
            message: "PTX text contains a NUL byte".into(),
        })?;
        let mut error_log = vec![0u8; LOG_BYTES];
        let mut info_log = vec![0u8; LOG_BYTES];
        let mut options = [
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            CUjit_option::CU_JIT_INFO_LOG_BUFFER,
            CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut values: [*mut c_void; 4] = [
            error_log.as_mut_ptr().cast(),
            LOG_BYTES as *mut c_void,
            info_log.as_mut_ptr().cast(),
            LOG_BYTES as *mut c_void,
        ];
        let mut raw: CUmodule = std::ptr::null_mut();
        let r = cu!(cuModuleLoadDataEx(
            &mut raw,
            image.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr()
        ));
        let text = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).trim().to_string()
        };
        if let Err(e) = r {
            let log = text(&error_log);
            return Err(Error::Ptx {
                module: name.into(),
                message: if log.is_empty() { e.to_string() } else { format!("{e}: {log}") },
            });
        }
        Ok(Module { device, raw, name: name.into(), info_log: text(&info_log) })
    }

    /// A kernel by its entry name.
    pub fn function(&self, entry: &str) -> Result<Function> {
        let c = CString::new(entry).map_err(|_| Error::invalid("kernel name contains NUL"))?;
        let mut f: CUfunction = std::ptr::null_mut();
        cu!(cuModuleGetFunction(&mut f, self.raw, c.as_ptr())).map_err(|e| Error::Ptx {
            module: self.name.clone(),
            message: format!("no kernel named {entry}: {e}"),
        })?;
        Ok(Function { raw: f })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuModuleUnload(self.raw))?));
        if let Err(e) = r {
            tracing::warn!("unloading module {} failed: {e}", self.name);
        }
    }
}

/// Launch geometry of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch covering `n` elements with `threads` per block.
    pub fn for_elements(n: u64, threads: u32) -> LaunchConfig {
        let blocks = n.div_ceil(u64::from(threads)).clamp(1, u64::from(u32::MAX)) as u32;
        LaunchConfig { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_mem_bytes: 0 }
    }
}

impl Function {
    /// Enqueues the kernel on `stream`.
    ///
    /// # Safety
    /// `params` must point to one value per kernel parameter, of the
    /// parameter's exact type and size, and every device pointer among them
    /// must be valid for the accesses the kernel makes.
    pub unsafe fn launch(&self, cfg: LaunchConfig, stream: cudarc::driver::sys::CUstream, params: &mut [*mut c_void]) -> Result<()> {
        cu!(cuLaunchKernel(
            self.raw,
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_mem_bytes,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut()
        ))?;
        Ok(())
    }

    /// Allows more than 48 KiB of dynamic shared memory for this kernel.
    pub fn set_max_dynamic_shared(&self, bytes: u32) -> Result<()> {
        cu!(cuFuncSetAttribute(
            self.raw,
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32
        ))?;
        Ok(())
    }
}

/// The last error of a kernel launch on this thread's context, if any
/// (`cuCtxSynchronize` reports asynchronous faults).
// CUstream is an opaque driver handle: passed to the driver, never dereferenced here.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn check_launch(stream: cudarc::driver::sys::CUstream) -> Result<()> {
    cu!(cuStreamSynchronize(stream))?;
    Ok(())
}
