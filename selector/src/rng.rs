//! A fast per-thread random number generator for index picks.

use std::cell::RefCell;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A uniform index in `0..len`; `len` must not be zero.
pub(crate) fn index(len: usize) -> usize {
    RNG.with(|rng| rng.borrow_mut().random_range(0..len))
}

/// Two distinct uniform indices in `0..len`; `len` must be at least 2.
pub(crate) fn two_distinct(len: usize) -> (usize, usize) {
    RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        let a = rng.random_range(0..len);
        let b = rng.random_range(0..len - 1);
        (a, if b >= a { b + 1 } else { b })
    })
}

/// Makes this thread's picks reproducible.
#[cfg(test)]
pub(crate) fn seed(seed: u64) {
    RNG.with(|rng| *rng.borrow_mut() = SmallRng::seed_from_u64(seed));
}
