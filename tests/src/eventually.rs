//! Waiting for a condition that becomes true after a while (a reload applied, a node
//! drained), with a failure that says what was awaited and what was seen last.
//!
//! ```ignore
//! assert_eventually!(Duration::from_secs(5), "the new route answers", || async {
//!     expect_eq(get(&url).await.body, "b")
//! });
//! // panics with: timed out after 5s waiting for: the new route answers
//! //              (last: got "404 page not found\n", want "b")
//! ```

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is checked again.
const INTERVAL: Duration = Duration::from_millis(20);

/// What a check returns: whether it held and, when it did not, what was seen.
pub trait Outcome {
    /// `Ok` when the condition holds, otherwise a description of what was seen.
    fn into_result(self) -> Result<(), String>;
}

impl Outcome for bool {
    fn into_result(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    fn into_result(self) -> Result<(), String> {
        self.map(drop).map_err(|seen| format!("{seen:?}"))
    }
}

/// What [`expect_eq`] saw when the values differed; prints as `got …, want …`.
pub struct Mismatch(String);

impl Debug for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `Ok` when `actual == expected`, otherwise what was seen (`got …, want …`); a check for
/// [`assert_eventually!`](crate::assert_eventually) that reports what it saw.
pub fn expect_eq<A, B>(actual: A, expected: B) -> Result<(), Mismatch>
where
    A: PartialEq<B> + Debug,
    B: Debug,
{
    if actual == expected {
        Ok(())
    } else {
        Err(Mismatch(format!("got {actual:?}, want {expected:?}")))
    }
}

/// Runs `check` every 20 ms until it holds or `timeout` passes (a check still running at
/// the deadline is abandoned). The error is the message [`assert_eventually!`] panics with.
///
/// [`assert_eventually!`]: crate::assert_eventually
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let Ok(outcome) = tokio::time::timeout_at(deadline, check()).await else {
            let last = last.unwrap_or_else(|| "no check finished".to_owned());
            return Err(format!(
                "timed out after {timeout:?} waiting for: {what} (last: {last}; a check was still running at the deadline)"
            ));
        };
        match outcome.into_result() {
            Ok(()) => return Ok(()),
            Err(seen) => last = Some(seen),
        }
        if Instant::now() + INTERVAL >= deadline {
            let last = last.unwrap_or_default();
            return Err(format!(
                "timed out after {timeout:?} waiting for: {what} (last: {last})"
            ));
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Polls a check until it holds; panics naming what it waited for and the last outcome.
///
/// `assert_eventually!(timeout, "what is awaited", || async { check })` where the check
/// returns `bool` or `Result<_, impl Debug>` (see [`expect_eq`]). Use it in async code.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $what:expr, $check:expr $(,)?) => {
        if let Err(message) = $crate::eventually::wait_until($timeout, $what, $check).await {
            panic!("{message}");
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_once_the_check_passes() {
        let mut calls = 0;
        let result = wait_until(Duration::from_secs(1), "three calls", || {
            calls += 1;
            let passed = calls >= 3;
            async move { passed }
        })
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(calls, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_names_the_wait_and_the_last_outcome() {
        let result = wait_until(Duration::from_secs(5), "the new route answers", || async {
            expect_eq("404", "b")
        })
        .await;
        assert_eq!(
            result,
            Err(
                "timed out after 5s waiting for: the new route answers (last: got \"404\", want \"b\")".to_owned()
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_ends_at_the_deadline() {
        let started = Instant::now();
        let result = wait_until(Duration::from_millis(300), "a hanging check", || {
            std::future::pending::<bool>()
        })
        .await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let message = result.expect_err("it times out");
        assert_eq!(
            message,
            "timed out after 300ms waiting for: a hanging check (last: no check finished; a check was still running at the deadline)"
        );
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 100ms waiting for: never (last: false)")]
    async fn the_macro_panics_with_the_message() {
        crate::assert_eventually!(Duration::from_millis(100), "never", || async { false });
    }
}
