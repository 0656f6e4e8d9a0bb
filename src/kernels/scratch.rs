//! Per-thread scratch buffers for the kernels' per-call working copies (scaled activations).
//! A one-token product calls its kernel once per piece of a claim, thousands of times per
//! decode step; allocating and freeing each copy made the allocator a visible share of a
//! dispatch's fixed cost.
//!
//! A buffer is taken out of its thread's slot and put back, rather than lent to a closure, so
//! that kernels compiled for particular target features use it in their own body.

use std::cell::Cell;

thread_local! {
    static U16: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static F32: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// This thread's `u16` scratch, at least `len` long (contents left from earlier use: write
/// what you read). Hand it back with [`put_u16`]; a second `take_u16` before that gets a new
/// buffer.
pub fn take_u16(len: usize) -> Vec<u16> {
    let mut buf = U16.take();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

/// Returns a buffer from [`take_u16`] to this thread's slot, keeping the larger of the two.
pub fn put_u16(buf: Vec<u16>) {
    U16.with(|slot| {
        let held = slot.take();
        slot.set(if held.len() >= buf.len() { held } else { buf });
    });
}

/// As [`take_u16`], for `f32` (hand it back with [`put_f32`]).
pub fn take_f32(len: usize) -> Vec<f32> {
    let mut buf = F32.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

/// As [`put_u16`], for buffers from [`take_f32`].
pub fn put_f32(buf: Vec<f32>) {
    F32.with(|slot| {
        let held = slot.take();
        slot.set(if held.len() >= buf.len() { held } else { buf });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_put_back_is_taken_again_and_grows_on_demand() {
        let mut b = take_u16(4);
        b[..4].copy_from_slice(&[1, 2, 3, 4]);
        let at = b.as_ptr();
        put_u16(b);
        let b = take_u16(2);
        assert_eq!((b.as_ptr(), &b[..4]), (at, &[1u16, 2, 3, 4][..]));
        // Taken while the slot is empty: a fresh buffer.
        let c = take_u16(3);
        assert_eq!(c, vec![0; 3]);
        put_u16(c);
        put_u16(b);
        let d = take_u16(8);
        assert!(d.len() >= 8 && d[..4] == [1, 2, 3, 4]);
    }
}
