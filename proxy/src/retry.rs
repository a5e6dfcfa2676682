//! Retry policy of an endpoint: conditions and a budget that caps retries under failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use http::Response;

/// Whether endpoints may retry at all: Kratos' `gw:Retry` feature flag, on by default, set
/// by the control service. Shared by every router a proxy builds; cheap to clone.
#[derive(Debug, Clone)]
pub struct RetrySwitch(Arc<AtomicBool>);

impl Default for RetrySwitch {
    fn default() -> Self {
        RetrySwitch(Arc::new(AtomicBool::new(true)))
    }
}

impl RetrySwitch {
    /// Turns retries on or off for every endpoint, from the next request on.
    pub fn set(&self, enabled: bool) {
        self.0.store(enabled, Ordering::Relaxed);
    }

    /// Whether retries are on.
    pub fn enabled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// When and how often an endpoint retries.
pub(crate) struct RetryPolicy {
    /// Total attempts, at least 1.
    pub attempts: u32,
    /// Timeout of each attempt (None = only the endpoint timeout applies).
    pub per_try_timeout: Option<Duration>,
    statuses: Vec<configs::StatusRange>,
    headers: Vec<(http::HeaderName, Vec<String>)>,
    budget: RetryBudget,
}

impl RetryPolicy {
    pub(crate) fn new(retry: Option<&configs::Retry>) -> Self {
        let Some(retry) = retry else {
            return Self {
                attempts: 1,
                per_try_timeout: None,
                statuses: vec![],
                headers: vec![],
                budget: RetryBudget::new(),
            };
        };
        let mut statuses = Vec::new();
        let mut headers = Vec::new();
        for condition in &retry.conditions {
            if let Some(range) = &condition.by_status_code {
                statuses.push(*range);
            }
            if let Some(header) = &condition.by_header {
                if let Ok(name) = http::HeaderName::from_bytes(header.name.as_bytes()) {
                    headers.push((name, header.values()));
                }
            }
        }
        Self {
            attempts: retry.attempts.max(1),
            per_try_timeout: retry.per_try_timeout.filter(|d| !d.is_zero()),
            statuses,
            headers,
            budget: RetryBudget::new(),
        }
    }

    /// Whether this response asks for another attempt.
    pub(crate) fn should_retry<B>(&self, response: &Response<B>) -> bool {
        let code = response.status().as_u16();
        if self.statuses.iter().any(|range| range.contains(code)) {
            return true;
        }
        self.headers.iter().any(|(name, values)| {
            response
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| values.iter().any(|want| want == v))
        })
    }

    pub(crate) fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

/// Lets retries add at most ~20% to an endpoint's load, with a reserve of 10 retries so a
/// quiet endpoint can still retry. Lock-free: one atomic balance in thousandths of a retry.
pub(crate) struct RetryBudget {
    balance: AtomicI64,
}

const RETRY_COST: i64 = 1000;
const DEPOSIT_PER_REQUEST: i64 = 200;
const RESERVE: i64 = 10 * RETRY_COST;
const CAP: i64 = 100 * RETRY_COST;

impl RetryBudget {
    fn new() -> Self {
        Self {
            balance: AtomicI64::new(RESERVE),
        }
    }

    /// Called once per request.
    pub(crate) fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < CAP).then(|| (b + DEPOSIT_PER_REQUEST).min(CAP))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then_some(b - RETRY_COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_reserve_then_a_fifth_of_requests() {
        let budget = RetryBudget::new();
        let mut granted = 0;
        for _ in 0..100 {
            if budget.withdraw() {
                granted += 1;
            }
        }
        assert_eq!(granted, 10, "the reserve");
        for _ in 0..100 {
            budget.deposit();
        }
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 20, "20% of 100 requests");
    }
}
