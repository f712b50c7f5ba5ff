//! Helpers shared by the CPU integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pipeswitch::store::shm::DIR_ENV;

static SHM_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory of this binary's stores. Created and exported once: the
/// environment is process-wide and the tests run in parallel threads. It is
/// removed when the test process exits (not by forked children, which leave
/// with `_exit`).
pub fn shm_dir() -> &'static Path {
    SHM_DIR.get_or_init(|| {
        // tmpfs when there is one: stores there can be page-locked (GPU tests).
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        let path = dir.expect("tempdir").keep();
        std::env::set_var(DIR_ENV, &path);
        // SAFETY: registers a function that only removes the directory.
        unsafe { libc::atexit(remove_shm_dir) };
        path
    })
}

extern "C" fn remove_shm_dir() {
    if let Some(dir) = SHM_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn seg_path(name: &str) -> PathBuf {
    shm_dir().join(format!("pipeswitch-{name}"))
}

/// Opens the store `name` of this binary's directory (panics on failure).
pub fn open(name: &str) -> pipeswitch::store::Store {
    shm_dir();
    pipeswitch::store::Store::open(name).unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// Deterministic, non-repeating bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}
