//! A named shared-memory segment, as NCCL does it: a file in /dev/shm whose
//! space is reserved with `fallocate` at creation (a full /dev/shm fails there,
//! not with SIGBUS at first touch), mapped shared by every process that opens
//! it, and locked with `flock` for changes.
//!
//! Per-slot liveness uses open-file-description locks (`F_OFD_SETLK`) on
//! single bytes far beyond the data ([`lock_byte`]): the kernel drops them
//! when their holder's last descriptor closes, when it dies included, in any
//! PID namespace.
//!
//! Opening refuses symbolic links, files that are not regular, files owned by
//! another user and files that others may write: a segment is trusted input
//! only when nobody else could have written it.

use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the directory of store segments (default /dev/shm).
pub const DIR_ENV: &str = "PIPESWITCH_SHM_DIR";
const PREFIX: &str = "pipeswitch-";

/// Checks a store name: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with '.'.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "bad store name {name:?}: use 1 to 64 letters, digits, '_', '.' or '-', not starting with '.'"
        )))
    }
}

/// The file that backs the store called `name`.
pub fn path_of(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    let dir = std::env::var_os(DIR_ENV).map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from);
    Ok(dir.join(format!("{PREFIX}{name}")))
}

/// An open, mapped segment.
#[derive(Debug)]
pub struct Segment {
    pub file: File,
    pub map: MmapRaw,
    pub path: PathBuf,
}

impl Segment {
    /// Creates a new segment of `bytes` bytes, failing if one exists. Its space
    /// is reserved up front; on any failure the file is removed again.
    pub fn create(path: &Path, bytes: u64) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    Error::AlreadyExists(format!("store segment {}", path.display()))
                }
                _ => Error::io(format!("creating {}", path.display()), e),
            })?;
        let result = (|| {
            let len = libc::off_t::try_from(bytes).map_err(|_| Error::invalid("store size too large"))?;
            // SAFETY: a valid fd; fallocate only reserves space.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
            if r != 0 {
                let errno = nix::errno::Errno::last();
                return Err(if errno == nix::errno::Errno::ENOSPC {
                    Error::StoreFull(format!(
                        "not enough shared memory for a {bytes}-byte store in {}",
                        path.parent().map_or_else(String::new, |p| p.display().to_string())
                    ))
                } else {
                    Error::os(format!("fallocate of {bytes} bytes for {}", path.display()), errno)
                });
            }
            let map = MmapOptions::new()
                .len(bytes as usize)
                .map_raw(&file)
                .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
            Ok(map)
        })();
        match result {
            Ok(map) => Ok(Segment { file, map, path: path.to_path_buf() }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Opens and maps an existing segment, after checking that it is a
    /// regular file (no symbolic link is followed), owned by this process's
    /// effective user and not writable by group or others.
    pub fn open(path: &Path) -> Result<Segment> {
        let file = open_checked(path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if len < super::layout::HEADER_BYTES {
            return Err(Error::corrupt(format!(
                "{} has {len} bytes, too small for a store",
                path.display()
            )));
        }
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        Ok(Segment { file, map, path: path.to_path_buf() })
    }

    /// A second open file description of the same file, for the slot locks
    /// that this process holds (leases, writes in progress): locks of one
    /// description do not conflict with each other, so the probes that look
    /// for other holders go through `self.file` instead.
    pub fn open_lock_file(&self) -> Result<File> {
        let f = open_checked(&self.path)?;
        let (a, b) = (stat(&self.file, &self.path)?, stat(&f, &self.path)?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(Error::InvalidState(format!(
                "{} was replaced while it was being opened",
                self.path.display()
            )));
        }
        Ok(f)
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Copies `out.len()` bytes at `offset` out of the segment.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len() as u64)?;
        // SAFETY: range checked; the mapping lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(offset as usize), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the segment at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        // SAFETY: range checked; the mapping lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset as usize), data.len()) };
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::Internal(format!(
                "segment access [{offset}, +{len}) outside {} bytes",
                self.len()
            ))),
        }
    }

    /// Takes the segment's cross-process lock: exclusive for changes, shared
    /// for reads. Released when the guard drops.
    pub fn lock(&self, exclusive: bool) -> Result<FlockGuard<'_>> {
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        loop {
            // SAFETY: a valid fd.
            if unsafe { libc::flock(self.file.as_raw_fd(), op) } == 0 {
                return Ok(FlockGuard { file: &self.file });
            }
            let errno = nix::errno::Errno::last();
            if errno != nix::errno::Errno::EINTR {
                return Err(Error::os(format!("flock {}", self.path.display()), errno));
            }
        }
    }
}

/// Holds a segment's `flock` until dropped.
pub struct FlockGuard<'a> {
    file: &'a File,
}

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: a valid fd.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn stat(file: &File, path: &Path) -> Result<std::fs::Metadata> {
    file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))
}

/// Opens an existing segment file read-write without following a symbolic
/// link, and checks its type, owner and mode.
fn open_checked(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!("no store segment {}", path.display())),
            _ if e.raw_os_error() == Some(libc::ELOOP) => Error::os(
                format!("{} is a symbolic link: store segments are opened only directly", path.display()),
                nix::errno::Errno::ELOOP,
            ),
            _ => Error::io(format!("opening {}", path.display()), e),
        })?;
    let md = stat(&file, path)?;
    if !md.file_type().is_file() {
        return Err(Error::invalid(format!("{} is not a regular file", path.display())));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(Error::os(
            format!(
                "store segment {} belongs to uid {}, not to this process's uid {me}: refusing to trust it",
                path.display(),
                md.uid()
            ),
            nix::errno::Errno::EACCES,
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(Error::os(
            format!(
                "store segment {} has mode {:o}: group or others may write it, refusing to trust it",
                path.display(),
                md.mode() & 0o7777
            ),
            nix::errno::Errno::EACCES,
        ));
    }
    Ok(file)
}

/// Offset of the lock byte `index`: far beyond any segment's data (POSIX
/// locks may cover bytes past the end of a file).
pub fn lock_byte(index: u64) -> i64 {
    (1i64 << 62) + index as i64
}

/// What an open-file-description lock request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
    Unlock,
}

fn flock_struct(byte: i64, kind: LockKind) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes (or releases) an open-file-description lock on one byte without
/// waiting. `Ok(false)`: another open file description holds a conflicting
/// lock.
pub fn ofd_lock(file: &File, byte: i64, kind: LockKind) -> Result<bool> {
    let fl = flock_struct(byte, kind);
    loop {
        // SAFETY: a valid fd and a valid flock struct.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
            return Ok(true);
        }
        let errno = nix::errno::Errno::last();
        match errno {
            nix::errno::Errno::EINTR => continue,
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES => return Ok(false),
            _ => return Err(Error::os(format!("fcntl(F_OFD_SETLK) at lock byte {byte}"), errno)),
        }
    }
}

/// True if an open file description other than `file`'s holds a lock on
/// `byte` that would conflict with an exclusive one.
pub fn ofd_locked_by_other(file: &File, byte: i64) -> Result<bool> {
    let mut fl = flock_struct(byte, LockKind::Exclusive);
    // SAFETY: a valid fd and a valid flock struct, written by the kernel.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(Error::os(format!("fcntl(F_OFD_GETLK) at lock byte {byte}"), nix::errno::Errno::last()));
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}
