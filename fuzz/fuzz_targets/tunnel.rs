//! The tunnel's frame decoder, fed by a peer sidecar: whatever arrives after OPEN is read as
//! one stream's DATA/FIN/RESET frames. It must end in data, a clean end or an error, never a
//! panic, and never hand out more payload bytes than the peer sent.
#![no_main]

use std::io::Cursor;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use moat_proxy::tunnel::{self, Stream};
use tokio::io::AsyncReadExt;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
});

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        // The stream's opening frame, as an accepting sidecar reads it.
        let _ = tunnel::read_open(&mut Cursor::new(data)).await;

        let io = tokio::io::join(Cursor::new(data.to_vec()), tokio::io::sink());
        let mut stream = Stream::new(io);
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            assert!(got.len() <= data.len(), "more payload than input");
        }
    });
});
