//! Where a forward pass's parallel parts run: on candle's worker pool, which the
//! calling thread joins, or on the calling thread alone, for a part of a batch that
//! runs side by side with another part on another thread (see
//! [`crate::model::BatchLayout`]).
//!
//! Work is cut into the same items either way, so results do not depend on where they
//! ran.

use std::cell::Cell;
use std::ops::Range;

thread_local! {
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` over `0..items` in chunks, on candle's pool, or in one call on this
/// thread while it works [`alone`].
pub(crate) fn execute_chunked(items: usize, f: impl Fn(Range<usize>) + Sync) {
    if ALONE.get() {
        f(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, f);
    }
}

/// The threads a call's work is cut for: the pool's, whether or not this thread
/// works alone, so that the cut (and with it the arithmetic) stays the same.
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f` with this thread's parallel parts on this thread only.
pub(crate) fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.set(self.0);
        }
    }
    let _restore = Restore(ALONE.replace(true));
    f()
}
