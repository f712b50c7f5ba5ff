"""Test setup, run before any test module is imported:

- store segments go to a fresh temporary directory (PIPESWITCH_SHM_DIR; the
  library reads it on every call), not straight into /dev/shm. It is made
  inside /dev/shm when that exists, because a switch page-locks the store
  (cuMemHostRegister), which needs tmpfs or hugetlbfs; removed at exit;
- the package is imported from this source tree (python/), also when an
  installed copy exists; with PIPESWITCH_TEST_INSTALLED=1 the installed
  package is tested instead (scripts/check-wheel.sh: a wheel in a venv).
"""

import atexit
import os
import shutil
import sys
import tempfile

_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
_shm_dir = tempfile.mkdtemp(prefix="pipeswitch-pytest-", dir=_parent)
os.environ["PIPESWITCH_SHM_DIR"] = _shm_dir
atexit.register(shutil.rmtree, _shm_dir, True)

if os.environ.get("PIPESWITCH_TEST_INSTALLED") != "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
