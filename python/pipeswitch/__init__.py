"""pipeswitch: Python bindings of libpipeswitch, millisecond GPU model
switching (PipeSwitch, OSDI 2020).

- :class:`Store`: the shared-memory host model store;
- :class:`Arena`: the device arena (model regions and the workspace);
- :class:`Switch`: the pipelined switch, one CUDA event per layer group;
- :func:`plan_groups`, :func:`plan_model`: the optimal layer grouping;
- :mod:`pipeswitch.torch` (imported on demand): registering ``nn.Module``\\ s
  and the active-standby worker.
- :mod:`pipeswitch.client` (``Client``), :mod:`pipeswitch.protocol` and
  ``python -m pipeswitch.worker``: a client and the PyTorch worker process of
  the ``pipeswitch serve`` daemon (imported on demand; standard library only).

The C library is loaded on first use (see :mod:`pipeswitch._lib` for where it
is looked for); importing this package never fails because it is missing.
Every failed C call raises a :class:`PipeSwitchError` subclass
(:mod:`pipeswitch.errors`). The raw ctypes layer, with every ``ps_*``
function, struct and ``PS_*`` constant of ``pipeswitch.h``, is
:mod:`pipeswitch._lib` (``pipeswitch.lib()`` is the loaded ``CDLL``).
"""

from . import _lib
from ._lib import CONSTANTS, library_path, lib
from .core import (
    DTYPE_NAMES,
    Arena,
    CostModel,
    CostRecord,
    LayerInfo,
    ModelInfo,
    ModelLease,
    Store,
    StoreUsage,
    Switch,
    TensorInfo,
    device_count,
    driver_available,
    dtype_code,
    dtype_name,
    last_error_message,
    measure_h2d,
    plan_closed_loop,
    plan_groups,
    plan_groups_cost,
    plan_makespan,
    plan_makespan_cost,
    plan_model,
    pluggable_allocator_args,
    status_str,
    version,
    version_number,
    workspace_attach,
    workspace_detach,
    workspace_usage,
)
from .errors import (
    AlreadyExists,
    ArenaFull,
    ArgumentError,
    CudaError,
    CudaOutOfMemory,
    FormatError,
    InternalError,
    InvalidHandle,
    LibraryNotFound,
    LibraryVersionMismatch,
    NoDevice,
    NoDriver,
    NotFound,
    OsError,
    PipeSwitchError,
    PtxError,
    ProtocolError,
    Disconnected,
    Refused,
    StateError,
    StoreFull,
)

__version__ = "0.2.0"

# The header's PS_* constants, as pipeswitch.PS_ERR_NOT_FOUND etc.
globals().update(CONSTANTS)

__all__ = [
    "Store", "Arena", "Switch", "ModelInfo", "ModelLease", "LayerInfo", "TensorInfo", "StoreUsage",
    "plan_groups", "plan_makespan", "plan_model", "plan_groups_cost", "plan_makespan_cost",
    "plan_closed_loop", "CostModel", "CostRecord", "measure_h2d", "driver_available",
    "device_count", "version", "version_number", "status_str", "last_error_message",
    "workspace_attach", "workspace_detach", "workspace_usage", "pluggable_allocator_args",
    "dtype_code", "dtype_name", "DTYPE_NAMES", "lib", "library_path", "CONSTANTS",
    "PipeSwitchError", "ArgumentError", "InvalidHandle", "StateError", "NotFound",
    "AlreadyExists", "StoreFull", "ArenaFull", "CudaError", "NoDriver", "NoDevice",
    "CudaOutOfMemory", "OsError", "FormatError", "PtxError", "ProtocolError", "Disconnected", "Refused",
    "InternalError",
    "LibraryNotFound", "LibraryVersionMismatch",
] + sorted(CONSTANTS)
