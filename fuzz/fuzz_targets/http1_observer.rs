//! The HTTP/1 observer that times requests on proxied connections without buffering them. It
//! reads both directions of a connection that either side may have crafted; the first byte of
//! each chunk says which side sent it. It must never panic and never report more responses
//! than the client sent requests.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use moat_proxy::observe::{Http1Observer, Sink};

#[derive(Default)]
struct Count {
    responses: usize,
    gave_up: bool,
}

impl Sink for Count {
    fn response(&mut self, _status: u16, _started: Instant) {
        self.responses += 1;
    }
    fn gave_up(&mut self, _why: &'static str) {
        self.gave_up = true;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut observer = Http1Observer::new();
    let mut sink = Count::default();
    let mut client_bytes = Vec::new();
    // Chunks: [side|len] then len bytes, so splits across reads are explored too.
    let mut rest = data;
    while let Some((&tag, tail)) = rest.split_first() {
        let len = usize::from(tag & 0x7f).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        if tag & 0x80 == 0 {
            client_bytes.extend_from_slice(chunk);
            observer.client_bytes(chunk, &mut sink);
        } else {
            observer.server_bytes(chunk, &mut sink);
        }
        rest = next;
    }
    // A head ends at an empty line: LF, then an optional CR, then LF (httparse, like most
    // servers, accepts bare-LF line ends), so every head ends in "\n\r\n" or "\n\n".
    let requests_started = client_bytes.windows(3).filter(|w| w == b"\n\r\n").count()
        + client_bytes.windows(2).filter(|w| w == b"\n\n").count();
    assert!(
        sink.responses <= requests_started.max(1) * 2,
        "{} responses for at most {requests_started} request heads",
        sink.responses
    );
    let _ = (observer.is_idle(), observer.is_done(), sink.gave_up);
});
