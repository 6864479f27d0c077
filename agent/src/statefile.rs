//! Files of the state dir written so that a crash or a full disk at any moment leaves either the
//! old file or the new one, never a mix: written aside, synced, renamed, and the directory synced
//! so that the rename itself survives a power cut.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// Replaces `path` with `bytes`, atomically and durably. On failure `path` is as it was and no
/// temporary file is left; the error names the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    sync_dir(path)
}

/// Syncs the directory that holds `path`, so that a rename or removal in it is durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["x.json"]);
        let e = write_atomic(&dir.path().join("no/such/dir/y.json"), b"").unwrap_err();
        assert!(format!("{e:#}").contains("no/such/dir/y.json"), "{e:#}");
    }
}
