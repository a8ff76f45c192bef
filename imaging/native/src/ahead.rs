//! Reading ahead on a helper thread: one thread decompresses and hashes a layer stream while
//! the calling thread parses it and creates the files, so the two halves of an unpack run on
//! two cores instead of taking turns on one.

use std::io::{self, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};

/// Bytes per chunk handed from the helper thread to the reader.
const CHUNK: usize = 1 << 20;
/// Chunks the helper may be ahead of the reader (bounds memory to about `AHEAD + 2` chunks).
const AHEAD: usize = 4;

/// The consumer's side: a `Read` over the bytes the helper thread produces, in order. An error
/// of the source arrives after the bytes that preceded it, exactly where a direct read would
/// have met it.
pub struct AheadReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    back: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    ended: bool,
    failed: bool,
}

impl Read for AheadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.failed {
                return Err(io::Error::other("the layer stream failed earlier"));
            }
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let spent = std::mem::replace(&mut self.cur, chunk);
                    self.pos = 0;
                    // Recycled if the helper has room; dropped otherwise.
                    let _ = self.back.try_send(spent);
                }
                Ok(Err(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                // The helper hung up: end of stream (a panic is reported by `read_ahead`).
                Err(_) => self.ended = true,
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Runs `consume` on a reader of everything `source` yields, while a helper thread reads
/// `source` up to a few chunks ahead. Returns `consume`'s result and `source` itself (for
/// example to finish a hash computed while reading), or `None` if the helper panicked.
/// If `consume` returns early, the helper stops at its next chunk.
pub fn read_ahead<S, T>(source: S, consume: impl FnOnce(&mut AheadReader) -> T) -> (T, Option<S>)
where
    S: Read + Send,
{
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(AHEAD);
    let (back, recycled) = mpsc::sync_channel::<Vec<u8>>(AHEAD + 2);
    std::thread::scope(|s| {
        let helper = s.spawn(move || produce(source, &tx, &recycled));
        let out = {
            let mut reader = AheadReader {
                rx,
                back,
                cur: Vec::new(),
                pos: 0,
                ended: false,
                failed: false,
            };
            consume(&mut reader)
            // `reader` is dropped here, so a helper still producing stops.
        };
        (out, helper.join().ok())
    })
}

fn produce<S: Read>(
    mut source: S,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    recycled: &Receiver<Vec<u8>>,
) -> S {
    loop {
        let mut buf = recycled.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut n = 0;
        let mut err = None;
        while n < CHUNK {
            match source.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        buf.truncate(n);
        if n > 0 && tx.send(Ok(buf)).is_err() {
            return source;
        }
        if let Some(e) = err {
            let _ = tx.send(Err(e));
            return source;
        }
        if n < CHUNK {
            return source;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_every_byte_in_order() {
        let data: Vec<u8> = (0..(3 * CHUNK + 12345)).map(|i| (i % 251) as u8).collect();
        let (got, src) = read_ahead(&data[..], |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        });
        assert_eq!(got, data);
        assert!(src.unwrap().is_empty());
    }

    #[test]
    fn errors_arrive_after_the_data_before_them() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("boom"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let (got, _) = read_ahead(Failing(CHUNK + 10), |r| {
            let mut v = Vec::new();
            let e = r.read_to_end(&mut v).unwrap_err();
            // A second read does not pretend the stream ended cleanly.
            assert!(r.read(&mut [0u8; 4]).is_err());
            (v.len(), e.to_string())
        });
        assert_eq!(got, (CHUNK + 10, "boom".to_string()));
    }

    #[test]
    fn an_early_stop_ends_the_helper() {
        let data = vec![1u8; 20 * CHUNK];
        let (n, src) = read_ahead(&data[..], |r| r.read(&mut [0u8; 10]).unwrap());
        assert_eq!(n, 10);
        // The helper stopped after a few chunks instead of reading everything.
        assert!(src.unwrap().len() >= 10 * CHUNK);
    }
}
