//! Bulk transfer through `write_vectored`, the way pages are sent.

mod common;

use std::io::{IoSlice, Read, Write};
use std::thread;
use std::time::Instant;

use common::trusting_pair;

const TOTAL: usize = 256 << 20;
const PAGE: usize = 4096;
const PAGES_PER_WRITE: usize = 64;

#[test]
fn bulk_transfer_through_write_vectored() {
    let (mut client, mut server) = trusting_pair();
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = server.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            // Spot checks: the byte at stream offset p belongs to page (p % period) / 4112,
            // whose header and data bytes are all that page's index.
            let first = total.next_multiple_of(509);
            for p in (first..total + n).step_by(509) {
                let expected = ((p % (PAGES_PER_WRITE * (PAGE + 16))) / (PAGE + 16)) as u8;
                assert_eq!(buf[p - total], expected, "byte {p}");
            }
            total += n;
        }
        (total, server)
    });

    // Pages with a small header each, like page records.
    let pages: Vec<Vec<u8>> = (0..PAGES_PER_WRITE).map(|i| vec![i as u8; PAGE]).collect();
    let headers: Vec<[u8; 16]> = (0..PAGES_PER_WRITE).map(|i| [i as u8; 16]).collect();
    let per_write = PAGES_PER_WRITE * (PAGE + 16);
    let started = Instant::now();
    let mut sent = 0;
    while sent < TOTAL {
        let mut slices = Vec::with_capacity(2 * PAGES_PER_WRITE);
        for (h, p) in headers.iter().zip(&pages) {
            slices.push(IoSlice::new(h));
            slices.push(IoSlice::new(p));
        }
        let mut bufs = &mut slices[..];
        let mut left = per_write;
        while left > 0 {
            let n = client.write_vectored(bufs).unwrap();
            assert!(n > 0);
            left -= n;
            IoSlice::advance_slices(&mut bufs, n);
        }
        sent += per_write;
    }
    client.flush().unwrap();
    assert_eq!(client.pending_output(), 0);
    client.close_write().unwrap();
    let (received, _server) = reader.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(received, sent);
    let rate = sent as f64 / secs / 1e6;
    println!(
        "{} MiB through TLS in {secs:.2} s: {rate:.0} MB/s",
        sent >> 20
    );
    // Only a guard against pathological slowness: the build machine is small and shared.
    assert!(rate > 50.0, "{rate:.0} MB/s");
}
