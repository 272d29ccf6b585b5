//! Protocol detection on a connection's first bytes (TLS ClientHello and its ALPN, HTTP/1,
//! the HTTP/2 preface). Besides not panicking, a verdict must be final: once a prefix is
//! classified, more bytes never change the answer, or the proxy would route a connection by
//! a guess it later contradicts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_proxy::detect::{self, Protocol};

fuzz_target!(|data: &[u8]| {
    for classify in [detect::inbound as fn(&[u8]) -> Protocol, detect::http] {
        let whole = classify(data);
        for end in 0..data.len() {
            let part = classify(&data[..end]);
            assert!(
                part == Protocol::NeedMore || part == whole,
                "prefix of {end} bytes says {part:?}, all {} bytes say {whole:?}",
                data.len()
            );
        }
    }
});
