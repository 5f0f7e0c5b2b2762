//! Replays every fuzz corpus file and every finding (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the checks the fuzz targets run
//! (`fuzz/checks.rs`), on stable and without services: what the fuzzer once
//! found stays fixed, and the corpus keeps covering every parser of outside
//! bytes. `fuzz/README.md` says how to fuzz and how a finding becomes a file here.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails its check",
                path.display()
            );
            files += 1;
        }
    }
    assert!(
        files > 0,
        "fuzz/corpus/{target} is empty: the seeds are missing"
    );
}

#[test]
fn pgoutput() {
    replay("pgoutput", checks::pgoutput);
}

#[test]
fn row_values() {
    replay("row_values", checks::row_values);
}

#[test]
fn message_content() {
    replay("message_content", checks::message_content);
}

#[test]
fn delivery() {
    replay("delivery", checks::delivery);
}

#[test]
fn config() {
    replay("config", checks::config);
}

#[test]
fn urls() {
    replay("urls", checks::urls);
}

/// The piece format the checks read round-trips (seeds are written with it).
#[test]
fn pieces_round_trip() {
    let pieces: [Option<&[u8]>; 4] = [Some(b"a"), None, Some(&[7u8; 300]), Some(b"")];
    let encoded = checks::Pieces::encode(&pieces);
    let mut read = checks::Pieces::new(&encoded);
    for p in pieces {
        assert_eq!(read.next_piece(), Some(p));
    }
    assert_eq!(read.next_piece(), None);
}
