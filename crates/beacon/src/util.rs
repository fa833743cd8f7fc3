//! Small shared helpers: atomic file writes.

use crate::error::{BeaconError, Result};
use std::path::{Path, PathBuf};

/// Write a file atomically: `write` fills a temporary file in the same directory, which is then
/// fsynced and renamed over `path`. A crash leaves either the old file or the new one, never a torn one.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| BeaconError::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|_| {
        let f = std::fs::File::open(&tmp).map_err(|e| BeaconError::io(&tmp, e))?;
        f.sync_all().map_err(|e| BeaconError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| BeaconError::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Atomically write bytes.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| BeaconError::io(tmp, e))
    })
}
