//! Files: sample grids, single images, raw float images (.npy), and how every file prism
//! writes gets its name.

pub mod grid;

use std::path::Path;

use crate::error::{Error, Result};

/// Finishes a file written under a temporary name: when `written` succeeded, renames `tmp` to
/// `path` (readers see the old file or the new one, never a part); when writing or renaming
/// failed, removes `tmp`, so that no `.tmp`/`.part` file is left behind.
pub fn commit_part(tmp: &Path, path: &Path, written: Result<()>) -> Result<()> {
    let done = written.and_then(|()| std::fs::rename(tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    done
}
