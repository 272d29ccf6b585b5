//! Polling file watcher that survives Kubernetes ConfigMap/Secret updates.
//!
//! Kubelet updates mounted ConfigMaps by swapping a `..data` symlink, which inotify-based
//! watchers on the file itself miss. Re-reading the (small) file and comparing contents is
//! simple, catches every form of update, and costs nothing at a few-second period.

use std::path::{Path, PathBuf};

/// Watches one file for content changes.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl FileWatch {
    /// Starts watching `path`; `current` is the content already loaded, if any.
    pub fn new(path: impl Into<PathBuf>, current: Option<Vec<u8>>) -> Self {
        Self {
            path: path.into(),
            last: current,
        }
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the new contents when the file changed since the last call.
    ///
    /// A file that cannot be read is reported as an error each time; the previous contents
    /// stay the reference, so the change is seen once the file is readable again.
    pub async fn poll(&mut self) -> Result<Option<Vec<u8>>, std::io::Error> {
        let now = tokio::fs::read(&self.path).await?;
        if self.last.as_deref() == Some(now.as_slice()) {
            return Ok(None);
        }
        self.last = Some(now.clone());
        Ok(Some(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sees_symlink_swaps_like_kubelet_does() {
        let dir = std::env::temp_dir().join(format!("moat-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v2")).unwrap();
        std::fs::write(dir.join("v1/f"), "one").unwrap();
        std::fs::write(dir.join("v2/f"), "two").unwrap();
        std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/f", dir.join("f")).unwrap();

        let mut w = FileWatch::new(dir.join("f"), Some(b"one".to_vec()));
        assert_eq!(w.poll().await.unwrap(), None);
        std::fs::remove_file(dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("v2", dir.join("..data")).unwrap();
        assert_eq!(w.poll().await.unwrap(), Some(b"two".to_vec()));
        assert_eq!(w.poll().await.unwrap(), None);
        std::fs::remove_file(dir.join("..data")).unwrap();
        assert!(w.poll().await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
