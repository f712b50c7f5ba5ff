"""Exceptions. Every failed C call raises a :class:`PipeSwitchError` whose
class follows the status's category (its hundreds):

============  ====================================================================
status        exception
============  ====================================================================
1xx           :class:`ArgumentError` (also a ``ValueError``); 103 is :class:`InvalidHandle`
2xx           :class:`StateError`; 200 :class:`NotFound` (also a ``LookupError``),
              201 :class:`AlreadyExists`, 202 :class:`StoreFull`, 203 :class:`ArenaFull`
3xx           :class:`CudaError`; 300 :class:`NoDriver`, 301 :class:`NoDevice`,
              303 :class:`CudaOutOfMemory`
4xx           :class:`OsError` (also a builtin ``OSError``)
5xx           :class:`FormatError`
6xx           :class:`PtxError`
9xx           :class:`InternalError`
============  ====================================================================

Each carries ``status`` (the code), ``name`` (e.g. ``"PS_ERR_NOT_FOUND"``) and
``message`` (the library's ``ps_last_error_message()``: which call failed and why).
"""


class LibraryNotFound(ImportError):
    """``libpipeswitch.so`` could not be found or loaded (raised on first use,
    never by ``import pipeswitch``). The message lists every place tried."""


class LibraryVersionMismatch(LibraryNotFound):
    """The loaded library's version (``ps_version_number()``) does not match
    the header these bindings were written for (same major and minor needed)."""


class PipeSwitchError(Exception):
    """A libpipeswitch call failed: ``status``, ``name``, ``message``."""

    def __init__(self, status, name, message):
        self.status = int(status)
        self.name = name
        self.message = message
        super().__init__("%s (%d): %s" % (name, self.status, message))

    def __reduce__(self):
        return (type(self), (self.status, self.name, self.message))


class ArgumentError(PipeSwitchError, ValueError):
    """1xx: a NULL, out-of-range or inconsistent argument, a too small buffer,
    or a dead handle."""


class InvalidHandle(ArgumentError):
    """103: the handle is not live (freed already, or a closed Python object)."""


class StateError(PipeSwitchError):
    """2xx: the call does not fit the current state (PS_ERR_INVALID_STATE)."""


class NotFound(StateError, LookupError):
    """200: no store, model, layer or tensor of that name/index."""


class AlreadyExists(StateError):
    """201: a store or model of that name exists already."""


class StoreFull(StateError):
    """202: the store (or /dev/shm) has no room."""


class ArenaFull(StateError):
    """203: the arena (or the device) has no room."""


class CudaError(PipeSwitchError):
    """3xx: a CUDA driver call failed."""


class NoDriver(CudaError):
    """300: no CUDA driver could be loaded."""


class NoDevice(CudaError):
    """301: no CUDA device, or none with that ordinal."""


class CudaOutOfMemory(CudaError):
    """303: the device ran out of memory."""


class OsError(PipeSwitchError, OSError):
    """4xx: a file or operating-system call failed (PS_ERR_IO, PS_ERR_OS).
    Also a builtin ``OSError`` (its ``errno`` is None; the message has the OS error)."""


class FormatError(PipeSwitchError):
    """5xx: a corrupt store, an unsupported store layout, or a bad safetensors file."""


class PtxError(PipeSwitchError):
    """6xx: a PTX module failed to load or lacks a kernel."""


class ProtocolError(PipeSwitchError):
    """7xx: talking to the daemon failed: a malformed message, a peer that went
    away, or a refusal."""


class Disconnected(ProtocolError):
    """701: the daemon, worker or client went away or did not answer."""


class Refused(ProtocolError):
    """702: the daemon refused the connection or the request."""


class InternalError(PipeSwitchError):
    """9xx: a bug inside the library (a caught panic or a failed invariant)."""


_EXACT = {
    103: InvalidHandle,
    200: NotFound,
    201: AlreadyExists,
    202: StoreFull,
    203: ArenaFull,
    300: NoDriver,
    301: NoDevice,
    303: CudaOutOfMemory,
    701: Disconnected,
    702: Refused,
}

_CATEGORY = {
    1: ArgumentError,
    2: StateError,
    3: CudaError,
    4: OsError,
    5: FormatError,
    6: PtxError,
    7: ProtocolError,
    9: InternalError,
}


def error_class(status):
    """The exception class for a non-OK status code."""
    status = int(status)
    return _EXACT.get(status) or _CATEGORY.get(status // 100, PipeSwitchError)


def from_status(status, name, message):
    """An exception instance for a non-OK status."""
    return error_class(status)(status, name, message)
