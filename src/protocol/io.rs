//! Frames over a Unix stream socket, with at most one file passed beside a
//! frame (`SCM_RIGHTS`), and tensors packed into and read from such a file.
//!
//! Writes use `MSG_NOSIGNAL`: a peer that went away gives an error, never a
//! SIGPIPE that would kill a C program linking the library.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::area::Areas;
use super::{decode_frame, encode_frame, Header, Message, Tensor, TensorData, HEADER_BYTES, INLINE_LIMIT};
use crate::error::{Error, Result};

fn send_all(sock: RawFd, mut bytes: &[u8], mut fd: Option<RawFd>) -> Result<()> {
    while !bytes.is_empty() || fd.is_some() {
        let iov = [IoSlice::new(bytes)];
        let raw;
        let cmsgs: Vec<ControlMessage<'_>> = match fd {
            Some(f) => {
                raw = [f];
                vec![ControlMessage::ScmRights(&raw)]
            }
            None => Vec::new(),
        };
        match sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                bytes = &bytes[n..];
                fd = None;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(Error::Disconnected("the peer closed the connection".into())),
            Err(e) => return Err(Error::os("sending a frame", e)),
        }
    }
    Ok(())
}

/// Sends `msg`, with `file` beside it if given.
pub fn send(stream: &UnixStream, msg: &Message, file: Option<BorrowedFd<'_>>) -> Result<()> {
    let frame = encode_frame(msg, u32::from(file.is_some()))?;
    send_all(stream.as_raw_fd(), &frame, file.map(|f| f.as_raw_fd()))
}

/// Receives one frame. `Ok(None)`: the peer closed the connection between
/// frames. A frame cut short, a bad header or body, or a file where none was
/// announced (or none where one was) are protocol errors.
pub fn recv(stream: &UnixStream) -> Result<Option<(Message, Option<OwnedFd>)>> {
    let mut head = [0u8; HEADER_BYTES];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let (got, file) = loop {
        let mut iov = [IoSliceMut::new(&mut head)];
        match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut file = None;
                let mut extra = 0;
                for c in msg.cmsgs().map_err(|e| Error::os("reading a frame's control data", e))? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel just installed this descriptor for us.
                            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                            if file.is_none() {
                                file = Some(owned);
                            } else {
                                extra += 1;
                            }
                        }
                    }
                }
                if extra > 0 || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(Error::Protocol("a frame came with more than one file".into()));
                }
                break (msg.bytes, file);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECONNRESET) => return Err(Error::Disconnected("the peer reset the connection".into())),
            Err(Errno::EAGAIN) => return Err(Error::Disconnected("timed out waiting for the peer".into())),
            Err(e) => return Err(Error::os("receiving a frame", e)),
        }
    };
    if got == 0 {
        return Ok(None);
    }
    read_exact(stream, &mut head[got..])?;
    let h = Header::decode(&head)?;
    match (h.fds, &file) {
        (0, Some(_)) => return Err(Error::Protocol("a file came with a frame that announced none".into())),
        (1, None) => return Err(Error::Protocol("a frame announced a file that did not come".into())),
        _ => {}
    }
    let mut frame = head.to_vec();
    frame.resize(HEADER_BYTES + h.body_len as usize, 0);
    read_exact(stream, &mut frame[HEADER_BYTES..])?;
    let (_, msg) = decode_frame(&frame)?;
    Ok(Some((msg, file)))
}

fn read_exact(mut stream: &UnixStream, buf: &mut [u8]) -> Result<()> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Protocol("the connection closed in the middle of a frame".into()),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Error::Disconnected("timed out in the middle of a frame".into())
        }
        _ => Error::io("reading a frame", e),
    })
}

/// A tensor to send: name, dtype code, shape and bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: u32,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// Packs tensors for a message: small ones inline, the rest into one new
/// shared-memory file (returned, to pass with the frame), sealed against
/// shrinking, growing and writing once written, so that a receiver may map
/// it ([`TensorViews`]) without the risk of a SIGBUS.
pub fn pack_tensors(tensors: &[TensorRef<'_>]) -> Result<(Vec<Tensor>, Option<OwnedFd>)> {
    let shared: u64 = tensors.iter().filter(|t| t.data.len() > INLINE_LIMIT).map(|t| t.data.len() as u64).sum();
    let mut file = if shared > 0 {
        use nix::sys::memfd::MemFdCreateFlag;
        let fd = nix::sys::memfd::memfd_create(c"pipeswitch-tensors", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(|e| Error::os("memfd_create for request tensors", e))?;
        Some(std::fs::File::from(fd))
    } else {
        None
    };
    let mut out = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        let data = if t.data.len() > INLINE_LIMIT {
            let f = file.as_mut().expect("created above");
            std::os::unix::fs::FileExt::write_all_at(f, t.data, offset)
                .map_err(|e| Error::io(format!("writing tensor {:?} to shared memory", t.name), e))?;
            let d = TensorData::Shared { offset, bytes: t.data.len() as u64 };
            offset += t.data.len() as u64;
            d
        } else {
            TensorData::Inline(t.data.to_vec())
        };
        out.push(Tensor { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec(), data });
    }
    if let Some(f) = &file {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL;
        fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| Error::os("sealing a tensor file", e))?;
    }
    Ok((out, file.map(OwnedFd::from)))
}

/// The tensors of a received message with their bytes: inline ones as they
/// came, shared ones from the file passed with the frame (each range checked
/// against the file's size, as [`TensorViews`] checks them), owned.
pub fn unpack_tensors(tensors: Vec<Tensor>, file: Option<&OwnedFd>) -> Result<Vec<(Tensor, Vec<u8>)>> {
    Ok(TensorViews::new(tensors, file)?.into_owned())
}

/// The tensors of a frame with their bytes borrowed, not copied: inline
/// ones from the frame, the others from one read-only mapping of the file
/// that came with it (populated at once, so reading it takes no page
/// faults). What a worker stages to the GPU straight from the client's
/// file. Tensors in input areas are read from the receiver's mappings of
/// them ([`TensorViews::with_areas`]).
pub struct TensorViews<'a> {
    tensors: Vec<Tensor>,
    backing: Backing,
    areas: Option<&'a Areas>,
}

enum Backing {
    /// No shared tensor.
    None,
    /// The file, sealed against shrinking: mapped.
    Map(memmap2::Mmap),
    /// A file that could still shrink under a mapping: each shared tensor
    /// copied out, in order.
    Copies(Vec<Vec<u8>>),
}

impl TensorViews<'static> {
    /// Checks that every shared tensor lies inside `file` (as
    /// [`unpack_tensors`] does) and maps the file. A tensor in an input
    /// area is refused: see [`TensorViews::with_areas`].
    pub fn new(tensors: Vec<Tensor>, file: Option<&OwnedFd>) -> Result<TensorViews<'static>> {
        TensorViews::with_areas(tensors, file, None)
    }
}

impl<'a> TensorViews<'a> {
    /// As [`TensorViews::new`], and tensors in input areas are read from
    /// `areas` (each area held and each range inside it, checked here).
    pub fn with_areas(tensors: Vec<Tensor>, file: Option<&OwnedFd>, areas: Option<&'a Areas>) -> Result<TensorViews<'a>> {
        for t in &tensors {
            if matches!(t.data, TensorData::Area { .. }) {
                match areas {
                    Some(a) => {
                        a.tensor_bytes(t)?;
                    }
                    None => return Err(Error::Protocol(format!("tensor {:?} is in an input area, and none is held here", t.name))),
                }
            }
        }
        let size = match file {
            Some(f) => {
                let st = nix::sys::stat::fstat(f.as_fd().as_raw_fd()).map_err(|e| Error::os("fstat of a tensor file", e))?;
                Some(st.st_size as u64)
            }
            None => None,
        };
        for t in &tensors {
            if let TensorData::Shared { offset, bytes } = &t.data {
                let Some(size) = size else {
                    return Err(Error::Protocol(format!("tensor {:?} is in a file that did not come", t.name)));
                };
                if offset.checked_add(*bytes).is_none_or(|e| e > size) {
                    return Err(Error::Protocol(format!("tensor {:?} claims [{offset}, +{bytes}) of a {size}-byte file", t.name)));
                }
            }
        }
        let backing = match (file, size) {
            (Some(f), Some(size)) if size > 0 => {
                use nix::fcntl::{fcntl, FcntlArg, SealFlag};
                let sealed = fcntl(f.as_raw_fd(), FcntlArg::F_GET_SEALS)
                    .map(|s| SealFlag::from_bits_truncate(s).contains(SealFlag::F_SEAL_SHRINK))
                    .unwrap_or(false);
                let file = std::fs::File::from(f.try_clone().map_err(|e| Error::io("duplicating a tensor file", e))?);
                if sealed {
                    // Only the bytes the tensors name are mapped (and
                    // populated): the file may be far larger, and sparse.
                    // The size checked above came before the seal: the
                    // file may have shrunk, then been sealed, in between;
                    // now it cannot shrink.
                    let end = tensors.iter().filter_map(|t| match &t.data {
                        TensorData::Shared { offset, bytes } => Some(offset + bytes),
                        TensorData::Inline(_) | TensorData::Area { .. } => None,
                    });
                    let end = end.max().unwrap_or(0);
                    let now = nix::sys::stat::fstat(f.as_raw_fd()).map_err(|e| Error::os("fstat of a tensor file", e))?.st_size as u64;
                    if end > now {
                        return Err(Error::Protocol(format!("the tensors claim {end} bytes of a file that shrank to {now}")));
                    }
                    if end == 0 {
                        Backing::None
                    } else {
                        // SAFETY: read-only mapping of bytes of a file that
                        // cannot shrink below them (sealed), so no access
                        // through it can fault.
                        Backing::Map(
                            unsafe { memmap2::MmapOptions::new().len(end as usize).populate().map(&file) }
                                .map_err(|e| Error::io("mapping a tensor file", e))?,
                        )
                    }
                } else {
                    let mut copies = Vec::new();
                    for t in &tensors {
                        if let TensorData::Shared { offset, bytes } = &t.data {
                            // The client names the size: no abort where it
                            // cannot be allocated.
                            let mut buf = Vec::new();
                            buf.try_reserve_exact(*bytes as usize)
                                .map_err(|e| Error::Protocol(format!("tensor {:?} of {bytes} bytes cannot be copied: {e}", t.name)))?;
                            buf.resize(*bytes as usize, 0);
                            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, *offset)
                                .map_err(|e| Error::io(format!("reading tensor {:?}", t.name), e))?;
                            copies.push(buf);
                        }
                    }
                    Backing::Copies(copies)
                }
            }
            _ => Backing::None,
        };
        Ok(TensorViews { tensors, backing, areas })
    }

    /// Whether any tensor is read from an input area.
    pub fn uses_areas(&self) -> bool {
        self.tensors.iter().any(|t| matches!(t.data, TensorData::Area { .. }))
    }

    /// Each tensor with its bytes, owned (copies of an unsealed file are
    /// moved out, not copied again).
    pub fn into_owned(self) -> Vec<(Tensor, Vec<u8>)> {
        match self.backing {
            Backing::Copies(copies) => {
                let mut copies = copies.into_iter();
                self.tensors
                    .into_iter()
                    .map(|t| {
                        let b = match &t.data {
                            TensorData::Inline(b) => b.clone(),
                            // One copy per shared tensor, in order (new()).
                            TensorData::Shared { .. } => copies.next().unwrap_or_default(),
                            // Checked by with_areas().
                            TensorData::Area { .. } => {
                                self.areas.and_then(|a| a.tensor_bytes(&t).ok().flatten()).map(<[u8]>::to_vec).unwrap_or_default()
                            }
                        };
                        (t, b)
                    })
                    .collect()
            }
            backing => {
                let views = TensorViews { tensors: self.tensors, backing, areas: self.areas };
                let bytes: Vec<Vec<u8>> = views.iter().map(|(_, b)| b.to_vec()).collect();
                views.tensors.into_iter().zip(bytes).collect()
            }
        }
    }

    /// Each tensor with its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&Tensor, &[u8])> {
        let mut shared = 0;
        self.tensors.iter().map(move |t| {
            let bytes: &[u8] = match (&t.data, &self.backing) {
                (TensorData::Inline(b), _) => b,
                // In bounds: checked by new() against the file mapped.
                (TensorData::Shared { offset, bytes }, Backing::Map(m)) => &m[*offset as usize..(*offset + *bytes) as usize],
                (TensorData::Shared { .. }, Backing::Copies(c)) => {
                    shared += 1;
                    &c[shared - 1]
                }
                // A zero-byte file holds only empty tensors (checked by new()).
                (TensorData::Shared { .. }, Backing::None) => &[],
                // Held and in range: checked by with_areas().
                (TensorData::Area { .. }, _) => self.areas.and_then(|a| a.tensor_bytes(t).ok().flatten()).unwrap_or(&[]),
            };
            (t, bytes)
        })
    }
}
