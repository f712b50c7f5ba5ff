//! Input areas (see the protocol's text): a client's shared-memory file that
//! its requests' large inputs are written into, given to the daemon once
//! and by the daemon to every worker, instead of a new file per request.
//!
//! - [`ClientArea`]: the client's side, a new memfd sealed against
//!   shrinking and growing, mapped for writing;
//! - [`check_file`]: what the daemon checks of a file a client gives;
//! - [`AreaMap`] and [`Areas`]: a receiver's (worker's) read-only mappings,
//!   by area id, that the tensors of a task are read from
//!   ([`super::io::TensorViews::with_areas`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::io::TensorRef;
use super::{Tensor, TensorData, INLINE_LIMIT, MAX_SHARED_TENSOR};
use crate::error::{Error, Result};

/// Where tensors start in an area: a multiple of this.
pub const AREA_ALIGN: u64 = 256;

/// The bytes a list of tensors takes in an area: those that do not travel
/// inline, each from an [`AREA_ALIGN`] boundary.
pub fn area_bytes_for(tensors: &[TensorRef<'_>]) -> u64 {
    let mut end = 0u64;
    for t in tensors.iter().filter(|t| t.data.len() > INLINE_LIMIT) {
        end = end.next_multiple_of(AREA_ALIGN) + t.data.len() as u64;
    }
    end
}

/// A client's input area: a memfd of `bytes` bytes sealed against
/// shrinking and growing (so that a worker's mapping of it can never
/// fault), mapped here for writing.
#[derive(Debug)]
pub struct ClientArea {
    fd: OwnedFd,
    map: memmap2::MmapMut,
    /// The daemon's id of it; 0 until it accepted it.
    pub id: u64,
}

impl ClientArea {
    /// A new area of `bytes` bytes (1 to [`MAX_SHARED_TENSOR`]), its pages
    /// populated now rather than by the first request.
    pub fn create(bytes: u64) -> Result<ClientArea> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::MemFdCreateFlag;
        if bytes == 0 || bytes > MAX_SHARED_TENSOR {
            return Err(Error::invalid(format!("an input area of {bytes} bytes (1 to {MAX_SHARED_TENSOR})")));
        }
        let len = usize::try_from(bytes).map_err(|_| Error::invalid(format!("an input area of {bytes} bytes does not fit this machine")))?;
        let fd = nix::sys::memfd::memfd_create(c"pipeswitch-input-area", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(|e| Error::os("memfd_create for an input area", e))?;
        nix::unistd::ftruncate(&fd, bytes as i64).map_err(|e| Error::os(format!("sizing an input area of {bytes} bytes"), e))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| Error::os("sealing an input area", e))?;
        let file = std::fs::File::from(fd.try_clone().map_err(|e| Error::io("duplicating an input area", e))?);
        // SAFETY: a shared mapping of a file sealed against shrinking, of
        // its whole size: no access through it can fault.
        let map = unsafe { memmap2::MmapOptions::new().len(len).populate().map_mut(&file) }
            .map_err(|e| Error::io(format!("mapping an input area of {bytes} bytes"), e))?;
        Ok(ClientArea { fd, map, id: 0 })
    }

    pub fn bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// The file, to pass with `InputArea`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Writes the tensors that do not travel inline into the area (from
    /// offset 0, each at an [`AREA_ALIGN`] boundary) and returns the
    /// message's tensors; None if they do not fit or the area has no id yet.
    /// The caller must not do this while a request that names the area is
    /// in flight.
    pub fn pack(&mut self, tensors: &[TensorRef<'_>]) -> Option<Vec<Tensor>> {
        if self.id == 0 || area_bytes_for(tensors) > self.bytes() {
            return None;
        }
        let mut at = 0u64;
        let out = tensors
            .iter()
            .map(|t| {
                let data = if t.data.len() > INLINE_LIMIT {
                    at = at.next_multiple_of(AREA_ALIGN);
                    let start = at as usize;
                    self.map[start..start + t.data.len()].copy_from_slice(t.data);
                    at += t.data.len() as u64;
                    TensorData::Area { area: self.id, offset: start as u64, bytes: t.data.len() as u64 }
                } else {
                    TensorData::Inline(t.data.to_vec())
                };
                Tensor { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec(), data }
            })
            .collect();
        Some(out)
    }
}

/// What the daemon checks of the file a client gives as its input area:
/// sealed against shrinking (a worker's mapping cannot fault) and at least
/// `bytes` long.
pub fn check_file(fd: BorrowedFd<'_>, bytes: u64) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map(SealFlag::from_bits_truncate).unwrap_or(SealFlag::empty());
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        return Err(Error::invalid("an input area must be a memfd sealed against shrinking (F_SEAL_SHRINK)"));
    }
    let size = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Error::os("fstat of an input area", e))?.st_size as u64;
    if size < bytes {
        return Err(Error::invalid(format!("an input area of {bytes} bytes in a file of {size}")));
    }
    Ok(())
}

/// A receiver's read-only mapping of an input area.
#[derive(Debug)]
pub struct AreaMap {
    map: memmap2::Mmap,
}

impl AreaMap {
    /// Checks the file as [`check_file`] does and maps its first `bytes`
    /// bytes, populated (no page faults when inputs are read from it).
    pub fn open(fd: &OwnedFd, bytes: u64) -> Result<AreaMap> {
        check_file(fd.as_fd(), bytes)?;
        let len = usize::try_from(bytes).map_err(|_| Error::invalid(format!("an input area of {bytes} bytes does not fit this machine")))?;
        let file = std::fs::File::from(fd.try_clone().map_err(|e| Error::io("duplicating an input area", e))?);
        // SAFETY: read-only mapping of bytes of a file sealed against
        // shrinking below them (checked above): no access can fault.
        let map = unsafe { memmap2::MmapOptions::new().len(len).populate().map(&file) }
            .map_err(|e| Error::io(format!("mapping an input area of {bytes} bytes"), e))?;
        Ok(AreaMap { map })
    }

    pub fn bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// The start of the mapping (page-aligned), e.g. to page-lock it.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Bytes `[offset, offset + bytes)`, checked.
    pub fn range(&self, offset: u64, bytes: u64) -> Result<&[u8]> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.bytes() => Ok(&self.map[offset as usize..end as usize]),
            _ => Err(Error::Protocol(format!("[{offset}, +{bytes}) lies outside an input area of {} bytes", self.bytes()))),
        }
    }
}

/// A receiver's input areas, by id.
#[derive(Debug, Default)]
pub struct Areas {
    maps: HashMap<u64, AreaMap>,
}

impl Areas {
    pub fn insert(&mut self, id: u64, map: AreaMap) -> Option<AreaMap> {
        self.maps.insert(id, map)
    }

    pub fn remove(&mut self, id: u64) -> Option<AreaMap> {
        self.maps.remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<&AreaMap> {
        self.maps.get(&id)
    }

    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The bytes of a tensor placed in an area: Err for an area not held
    /// here or a range outside it.
    pub fn tensor_bytes(&self, t: &Tensor) -> Result<Option<&[u8]>> {
        let TensorData::Area { area, offset, bytes } = &t.data else { return Ok(None) };
        let map = self
            .get(*area)
            .ok_or_else(|| Error::Protocol(format!("tensor {:?} names input area {area}, which is not held here", t.name)))?;
        map.range(*offset, *bytes).map(Some).map_err(|e| Error::Protocol(format!("tensor {:?}: {e}", t.name)))
    }
}
