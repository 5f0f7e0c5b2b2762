//! Reading the small files settings name (the configuration, password files,
//! certificates and keys), a leaf: a regular file of bounded size, so a setting
//! that points at `/dev/zero`, a FIFO or a huge file is refused at start-up
//! instead of hanging it or filling its memory.

use std::io::Read;

/// The most any such file may hold (a certificate bundle stays far below).
pub const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// The content of `path`, when it is a regular file of at most [`MAX_BYTES`];
/// otherwise what is wrong, to follow "{path} ".
pub fn read_small(path: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be read ({e})"))?;
    if !meta.is_file() {
        return Err(
            "is not a regular file (a device, a directory or a pipe): name the file itself".into(),
        );
    }
    if meta.len() > MAX_BYTES {
        return Err(format!(
            "is {} bytes; a file a setting names may hold at most {MAX_BYTES}",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot be read ({e})"))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!("grew past {MAX_BYTES} bytes while it was read"));
    }
    Ok(bytes)
}

/// [`read_small`] as UTF-8 text.
pub fn read_small_text(path: &str) -> Result<String, String> {
    String::from_utf8(read_small(path)?).map_err(|_| "is not UTF-8 text".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_missing_files_are_refused() {
        assert!(read_small("/dev/zero")
            .unwrap_err()
            .contains("not a regular file"));
        assert!(read_small("/tmp")
            .unwrap_err()
            .contains("not a regular file"));
        assert!(read_small("/nonexistent/x")
            .unwrap_err()
            .contains("cannot be read"));
    }

    #[test]
    fn a_regular_file_is_read_and_a_huge_one_refused() {
        let dir = std::env::temp_dir().join(format!("outbox-relay-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"secret\n").unwrap();
        assert_eq!(
            read_small_text(small.to_str().unwrap()).unwrap(),
            "secret\n"
        );
        let huge = dir.join("huge");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_BYTES + 1).unwrap();
        assert!(read_small(huge.to_str().unwrap())
            .unwrap_err()
            .contains("at most"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
