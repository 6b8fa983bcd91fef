//! Copy buffers kept per thread for the next connection: a short connection would otherwise
//! allocate and free two 16 KiB buffers, a size the allocator serves from its shared bins
//! (on the connection-rate benchmark, malloc and free were about 3 % of the proxy's CPU).

use std::cell::RefCell;

/// Per thread; at 16 KiB each, half a MiB at most.
const KEPT: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of `capacity`, reused when this thread has one of that size.
pub(super) fn take(capacity: usize) -> Vec<u8> {
    SPARE
        .with_borrow_mut(|spare| spare.pop())
        .filter(|buf| buf.capacity() == capacity)
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps `buf` for a later [`take`] on this thread, unless enough are kept already.
pub(super) fn give_back(mut buf: Vec<u8>) {
    buf.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < KEPT {
            spare.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_handed_out_again_empty() {
        let mut buf = take(1024);
        buf.extend_from_slice(b"left over");
        let ptr = buf.as_ptr();
        give_back(buf);
        let again = take(1024);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), 1024);
    }

    #[test]
    fn only_a_bounded_number_are_kept() {
        let bufs: Vec<_> = (0..KEPT + 5).map(|_| take(64)).collect();
        for buf in bufs {
            give_back(buf);
        }
        assert_eq!(SPARE.with_borrow(Vec::len), KEPT);
    }
}
