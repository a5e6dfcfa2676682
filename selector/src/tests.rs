//! Unit tests for every algorithm, apply and filters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::p2c::{FORCE_PICK_GAP, P2c};
use crate::wrr::Wrr;
use crate::{
    Algorithm, DEFAULT_WEIGHT, DoneInfo, Node, NodeFilter, SelectError, Selector, build, rng,
};

const OK: DoneInfo = DoneInfo { success: true };
const FAILED: DoneInfo = DoneInfo { success: false };
const ALL: [Algorithm; 3] = [Algorithm::P2c, Algorithm::Wrr, Algorithm::Random];

fn nodes(addresses: &[&str]) -> Vec<Node> {
    addresses
        .iter()
        .map(|address| Node::new(*address))
        .collect()
}

fn weighted(address: &str, weight: i64) -> Node {
    Node {
        weight: Some(weight),
        ..Node::new(address)
    }
}

fn only(address: &'static str) -> NodeFilter {
    Arc::new(move |node: &Node| node.address == address)
}

fn except(address: &'static str) -> NodeFilter {
    Arc::new(move |node: &Node| node.address != address)
}

/// Picks `count` times (reporting success at once) and counts picks per address.
fn tally(selector: &dyn Selector, filters: &[NodeFilter], count: usize) -> HashMap<String, usize> {
    let mut picks = HashMap::new();
    for _ in 0..count {
        let (node, done) = selector.select(filters).expect("a node");
        done.done(OK);
        *picks.entry(node.address.clone()).or_default() += 1;
    }
    picks
}

fn addresses(list: &[Arc<Node>]) -> Vec<&str> {
    list.iter().map(|node| node.address.as_str()).collect()
}

#[test]
fn done_and_selectors_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<crate::Done>();
    assert_send_sync::<Arc<dyn Selector>>();
    assert_send_sync::<SelectError>();
}

#[test]
fn algorithm_parses_config_names() {
    assert_eq!("".parse(), Ok(Algorithm::P2c));
    assert_eq!("p2c".parse(), Ok(Algorithm::P2c));
    assert_eq!("wrr".parse(), Ok(Algorithm::Wrr));
    assert_eq!("random".parse(), Ok(Algorithm::Random));
    assert_eq!(Algorithm::default(), Algorithm::P2c);
    let err = "round-robin".parse::<Algorithm>().unwrap_err();
    assert!(err.to_string().contains("\"round-robin\""), "{err}");
    for algorithm in ALL {
        assert_eq!(algorithm.to_string().parse(), Ok(algorithm));
    }
}

#[test]
fn empty_set_has_no_node() {
    for algorithm in ALL {
        let selector = build(algorithm);
        assert!(matches!(
            selector.select(&[]),
            Err(SelectError::NoAvailable)
        ));
        selector.apply(nodes(&["a:1"]));
        selector.apply(Vec::new());
        assert!(
            matches!(selector.select(&[]), Err(SelectError::NoAvailable)),
            "{algorithm}"
        );
        assert!(selector.nodes().is_empty());
    }
}

#[test]
fn single_node_is_always_picked() {
    for algorithm in ALL {
        let selector = build(algorithm);
        selector.apply(nodes(&["a:1"]));
        assert_eq!(tally(&*selector, &[], 50)["a:1"], 50, "{algorithm}");
    }
}

#[test]
fn filters_exclude_nodes() {
    for algorithm in ALL {
        let selector = build(algorithm);
        selector.apply(nodes(&["a:1", "b:1", "c:1"]));
        let picks = tally(&*selector, &[except("b:1")], 600);
        assert!(!picks.contains_key("b:1"), "{algorithm}: {picks:?}");
        assert_eq!(picks.values().sum::<usize>(), 600);
        if algorithm != Algorithm::P2c {
            // p2c legitimately settles on whichever node answered faster.
            assert!(
                picks["a:1"] > 100 && picks["c:1"] > 100,
                "{algorithm}: {picks:?}"
            );
        }

        let picks = tally(&*selector, &[except("a:1"), except("c:1")], 50);
        assert_eq!(picks.get("b:1"), Some(&50), "{algorithm}");

        let none = [only("a:1"), only("c:1")];
        assert!(
            matches!(selector.select(&none), Err(SelectError::NoAvailable)),
            "{algorithm}"
        );
    }
}

#[test]
fn nodes_lists_apply_order_and_new_fields() {
    for algorithm in ALL {
        let selector = build(algorithm);
        selector.apply(nodes(&["c:1", "a:1", "b:1"]));
        assert_eq!(addresses(&selector.nodes()), ["c:1", "a:1", "b:1"]);
        selector.apply(vec![weighted("a:1", 7), Node::new("d:1")]);
        let listed = selector.nodes();
        assert_eq!(addresses(&listed), ["a:1", "d:1"], "{algorithm}");
        assert_eq!(
            listed[0].weight,
            Some(7),
            "apply must publish the new node value"
        );
    }
}

#[test]
fn effective_weight_defaults_and_clamps() {
    assert_eq!(Node::new("a:1").effective_weight(), DEFAULT_WEIGHT);
    assert_eq!(weighted("a:1", 0).effective_weight(), 1);
    assert_eq!(weighted("a:1", -4).effective_weight(), 1);
    assert_eq!(weighted("a:1", 3).effective_weight(), 3);
    assert_eq!(
        weighted("a:1", i64::MAX).effective_weight(),
        i64::from(u32::MAX)
    );
}

mod wrr {
    use super::*;

    fn sequence(selector: &dyn Selector, count: usize) -> String {
        (0..count)
            .map(|_| {
                let (node, done) = selector.select(&[]).expect("a node");
                done.done(OK);
                node.address.chars().next().unwrap_or('?')
            })
            .collect()
    }

    #[test]
    fn weights_three_to_one_are_exact_and_smooth() {
        let selector = build(Algorithm::Wrr);
        selector.apply(vec![weighted("a:1", 3), weighted("b:1", 1)]);
        let picks = sequence(&*selector, 4_000);
        assert_eq!(picks.matches('a').count(), 3_000);
        assert_eq!(picks.matches('b').count(), 1_000);
        // Smooth: every window of total weight (4) holds exactly the weights, so the heavy
        // node never runs more than 3 times in a row (a burst would be "aaab" then "baaa").
        for window in picks.as_bytes().chunks(4) {
            assert_eq!(window, b"aaba");
        }
        let longest = picks.split('b').map(str::len).max();
        assert_eq!(longest, Some(3));
    }

    #[test]
    fn follows_the_nginx_sequence() {
        // The example from nginx's commit introducing smooth wrr: weights 5, 1, 1.
        let selector = build(Algorithm::Wrr);
        selector.apply(vec![
            weighted("a:1", 5),
            weighted("b:1", 1),
            weighted("c:1", 1),
        ]);
        assert_eq!(sequence(&*selector, 14), "aabacaaaabacaa");
    }

    #[test]
    fn default_and_clamped_weights() {
        let selector = build(Algorithm::Wrr);
        // None = 10, 0 and negative = 1.
        selector.apply(vec![
            Node::new("a:1"),
            weighted("b:1", 0),
            weighted("c:1", -5),
        ]);
        let picks = tally(&*selector, &[], 1_200);
        assert_eq!(picks["a:1"], 1_000);
        assert_eq!(picks["b:1"], 100);
        assert_eq!(picks["c:1"], 100);
    }

    #[test]
    fn filtered_picks_keep_proportions_among_eligible() {
        let selector = build(Algorithm::Wrr);
        selector.apply(vec![
            weighted("a:1", 3),
            weighted("b:1", 1),
            weighted("c:1", 50),
        ]);
        let picks = tally(&*selector, &[except("c:1")], 400);
        assert_eq!(picks.get("a:1"), Some(&300));
        assert_eq!(picks.get("b:1"), Some(&100));
        assert_eq!(picks.get("c:1"), None);
    }

    #[test]
    fn apply_keeps_current_weights() {
        let selector = Wrr::default();
        selector.apply(vec![weighted("a:1", 3), weighted("b:1", 1)]);
        let (first, _) = selector.select(&[]).expect("a node");
        assert_eq!(first.address, "a:1");
        assert_eq!(selector.current_weight("a:1"), Some(-1));
        assert_eq!(selector.current_weight("b:1"), Some(1));

        selector.apply(vec![
            weighted("b:1", 1),
            weighted("a:1", 3),
            weighted("c:1", 1),
        ]);
        assert_eq!(selector.current_weight("a:1"), Some(-1));
        assert_eq!(selector.current_weight("b:1"), Some(1));
        assert_eq!(selector.current_weight("c:1"), Some(0));

        selector.apply(vec![weighted("a:1", 3)]);
        selector.apply(vec![weighted("a:1", 3), weighted("b:1", 1)]);
        assert_eq!(
            selector.current_weight("b:1"),
            Some(0),
            "b was removed then re-added"
        );
    }
}

mod random {
    use super::*;

    #[test]
    fn roughly_uniform() {
        rng::seed(7);
        let selector = build(Algorithm::Random);
        selector.apply(nodes(&["a:1", "b:1", "c:1", "d:1"]));
        let picks = tally(&*selector, &[], 10_000);
        assert_eq!(picks.len(), 4);
        for (address, count) in &picks {
            // 2,500 expected; 5% tolerance (about 3 standard deviations).
            assert!((2_375..=2_625).contains(count), "{address}: {picks:?}");
        }
    }
}

mod p2c {
    use super::*;

    /// A simulated clock: picks and reports happen at controlled instants.
    struct Clock(Instant);

    impl Clock {
        fn start() -> Self {
            Clock(Instant::now())
        }

        fn advance(&mut self, by: Duration) -> Instant {
            self.0 += by;
            self.0
        }
    }

    /// Picks once at the current time, lets `outcome(address)` elapse and reports it.
    fn round(
        selector: &P2c,
        clock: &mut Clock,
        filters: &[NodeFilter],
        outcome: impl Fn(&str) -> (Duration, DoneInfo),
    ) -> String {
        let (node, done) = selector.select_at(filters, clock.0).expect("a node");
        let (latency, info) = outcome(&node.address);
        done.done_at(info, clock.advance(latency));
        node.address.clone()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn count(picks: &[String], address: &str) -> usize {
        picks.iter().filter(|picked| *picked == address).count()
    }

    #[test]
    fn prefers_the_faster_node() {
        rng::seed(1);
        let selector = P2c::default();
        selector.apply(nodes(&["fast:1", "slow:1"]));
        let mut clock = Clock::start();
        let latency = |address: &str| {
            let latency = if address == "fast:1" { ms(10) } else { ms(100) };
            (latency, OK)
        };
        for _ in 0..50 {
            round(&selector, &mut clock, &[], latency);
        }
        let picks: Vec<String> = (0..1_000)
            .map(|_| round(&selector, &mut clock, &[], latency))
            .collect();
        let fast = count(&picks, "fast:1");
        assert!(fast > 800, "fast node got {fast} of 1000");
        // The slow node still gets its forced picks (about one per 3 s of ~10 s simulated).
        assert!(count(&picks, "slow:1") >= 2, "no forced pick");
    }

    #[test]
    fn moves_traffic_away_from_a_failing_node() {
        rng::seed(2);
        let selector = P2c::default();
        selector.apply(nodes(&["good:1", "bad:1"]));
        let mut clock = Clock::start();
        let healthy = |_: &str| (ms(20), OK);
        let before: Vec<String> = (0..400)
            .map(|_| round(&selector, &mut clock, &[], healthy))
            .collect();
        assert!(
            count(&before, "bad:1") > 100,
            "both healthy: traffic is shared"
        );

        let bad_fails = |address: &str| (ms(20), if address == "bad:1" { FAILED } else { OK });
        for _ in 0..20 {
            round(&selector, &mut clock, &[], bad_fails);
        }
        let after: Vec<String> = (0..1_000)
            .map(|_| round(&selector, &mut clock, &[], bad_fails))
            .collect();
        let bad = count(&after, "bad:1");
        assert!(bad <= 20, "failing node still got {bad} of 1000");
        let stats = selector.stats("bad:1").expect("bad node stats");
        assert!(stats.success() < 0.5, "success EWMA {}", stats.success());
    }

    #[test]
    fn forces_a_pick_of_a_node_left_unpicked_for_three_seconds() {
        let selector = P2c::default();
        selector.apply(nodes(&["fast:1", "slow:1"]));
        let mut clock = Clock::start();
        // One sample each: slow loses every comparison from now on.
        round(&selector, &mut clock, &[only("slow:1")], |_| (ms(500), OK));
        let slow_picked_at = clock.0 - ms(500);
        round(&selector, &mut clock, &[only("fast:1")], |_| (ms(5), OK));

        let mut forced = Vec::new();
        for _ in 0..1_000 {
            let now = clock.0;
            let slower = |address: &str| {
                let latency = if address == "slow:1" { ms(100) } else { ms(10) };
                (latency, OK)
            };
            if round(&selector, &mut clock, &[], slower) == "slow:1" {
                forced.push(now);
            }
        }
        // About 10 s simulated: forced picks 3 s apart, each shortly after the gap elapsed.
        assert_eq!(forced.len(), 3, "{forced:?}");
        let mut previous = slow_picked_at;
        for at in forced {
            let gap = at - previous;
            assert!(
                gap > FORCE_PICK_GAP && gap < FORCE_PICK_GAP + ms(20),
                "{gap:?}"
            );
            previous = at;
        }
    }

    #[test]
    fn forced_pick_is_claimed_once() {
        let selector = P2c::default();
        selector.apply(nodes(&["a:1"]));
        let stats = selector.stats("a:1").expect("stats");
        let later = Instant::now() + FORCE_PICK_GAP + ms(1);
        assert!(stats.try_force(later, FORCE_PICK_GAP));
        assert!(!stats.try_force(later, FORCE_PICK_GAP), "claimed twice");
        assert!(!stats.try_force(later + ms(100), FORCE_PICK_GAP));
    }

    #[test]
    fn new_node_gets_traffic_at_once() {
        rng::seed(3);
        let selector = P2c::default();
        selector.apply(nodes(&["a:1", "b:1"]));
        let mut clock = Clock::start();
        let steady = |_: &str| (ms(20), OK);
        for _ in 0..200 {
            round(&selector, &mut clock, &[], steady);
        }
        selector.apply_at(nodes(&["a:1", "b:1", "c:1"]), clock.0);
        let picks: Vec<String> = (0..300)
            .map(|_| round(&selector, &mut clock, &[], steady))
            .collect();
        let new = count(&picks, "c:1");
        assert!(new >= 60, "new node got {new} of 300");
    }

    #[test]
    fn avoids_a_node_with_requests_in_flight() {
        rng::seed(4);
        let selector = P2c::default();
        selector.apply(nodes(&["busy:1", "idle:1"]));
        let mut clock = Clock::start();
        for _ in 0..20 {
            round(&selector, &mut clock, &[], |_| (ms(20), OK));
        }
        let held: Vec<_> = (0..5)
            .map(|_| {
                let (_, done) = selector
                    .select_at(&[only("busy:1")], clock.0)
                    .expect("busy node");
                done
            })
            .collect();
        let picks: Vec<String> = (0..20)
            .map(|_| round(&selector, &mut clock, &[], |_| (ms(20), OK)))
            .collect();
        assert_eq!(count(&picks, "idle:1"), 20);
        drop(held);
        assert_eq!(selector.stats("busy:1").map(|s| s.in_flight()), Some(0));
    }

    #[test]
    fn dropping_done_releases_without_a_sample() {
        let selector = P2c::default();
        selector.apply(nodes(&["a:1"]));
        let stats = selector.stats("a:1").expect("stats");
        let (_, done) = selector.select(&[]).expect("a node");
        assert_eq!(stats.in_flight(), 1);
        drop(done);
        assert_eq!(stats.in_flight(), 0);
        assert_eq!(stats.latency(), None);

        let now = Instant::now();
        let (_, done) = selector.select_at(&[], now).expect("a node");
        done.done_at(FAILED, now + ms(40));
        assert_eq!(stats.in_flight(), 0);
        let latency = stats.latency().expect("a latency sample");
        assert!((latency - 40e6).abs() < 1.0, "{latency}");
        assert_eq!(
            stats.success(),
            0.0,
            "the first sample replaces the initial value"
        );
    }

    #[test]
    fn ewma_decays_with_elapsed_time() {
        let selector = P2c::default();
        selector.apply(nodes(&["a:1"]));
        let stats = selector.stats("a:1").expect("stats");
        let mut clock = Clock::start();
        round(&selector, &mut clock, &[], |_| (ms(100), OK));
        // A sample 600 ms (one tau) later keeps e^-1 of the old average.
        clock.advance(ms(590));
        round(&selector, &mut clock, &[], |_| (ms(10), OK));
        let keep = (-1f64).exp();
        let expected = 100e6 * keep + 10e6 * (1.0 - keep);
        let latency = stats.latency().expect("latency");
        assert!((latency - expected).abs() < 1e3, "{latency} vs {expected}");
        // A sample long after replaces it almost entirely.
        clock.advance(Duration::from_secs(30));
        round(&selector, &mut clock, &[], |_| (ms(10), OK));
        let latency = stats.latency().expect("latency");
        assert!((latency - 10e6).abs() < 1e3, "{latency}");
    }

    #[test]
    fn apply_keeps_stats_of_surviving_nodes() {
        let selector = P2c::default();
        selector.apply(nodes(&["a:1", "b:1"]));
        let mut clock = Clock::start();
        round(&selector, &mut clock, &[only("a:1")], |_| (ms(30), FAILED));
        let (_, in_flight) = selector.select_at(&[only("a:1")], clock.0).expect("a");
        let before = selector.stats("a:1").expect("a stats");
        let latency = before.latency();
        assert!(latency.is_some());

        selector.apply(nodes(&["c:1", "a:1", "b:1", "d:1"]));
        let after = selector.stats("a:1").expect("a stats");
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.latency(), latency);
        assert_eq!(after.success(), 0.0);
        assert_eq!(after.in_flight(), 1);
        assert_eq!(selector.stats("c:1").and_then(|s| s.latency()), None);

        // Removed, then re-added: fresh statistics; the old pick still releases cleanly.
        selector.apply(nodes(&["b:1"]));
        assert!(selector.stats("a:1").is_none());
        drop(in_flight);
        assert_eq!(before.in_flight(), 0);
        selector.apply(nodes(&["b:1", "a:1"]));
        let fresh = selector.stats("a:1").expect("a stats");
        assert!(!Arc::ptr_eq(&before, &fresh));
        assert_eq!(fresh.latency(), None);

        // The tls flag is part of a node's identity.
        let tls = Node {
            tls: true,
            ..Node::new("b:1")
        };
        let plain = selector.stats("b:1").expect("b stats");
        selector.apply(vec![tls]);
        let secure = selector.stats("b:1").expect("b stats");
        assert!(!Arc::ptr_eq(&plain, &secure));
    }
}

/// Threads select and report while another thread applies changing node sets: nothing
/// panics, every pick belongs to a set applied before or during the select, and in-flight
/// counts return to zero.
#[test]
fn stress_concurrent_select_and_apply() {
    const THREADS: usize = 4;
    const PICKS: usize = 20_000;
    const SETS: usize = 200;

    let universe: Vec<String> = (0..12).map(|i| format!("10.0.0.{i}:80")).collect();
    // Deterministic pseudo-random subsets, some empty.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let sets: Vec<Vec<Node>> = (0..SETS)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let mask = state >> 52;
            universe
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(i, address)| Node {
                    weight: Some(i as i64 % 4),
                    tls: i % 5 == 0,
                    ..Node::new(address.as_str())
                })
                .collect()
        })
        .collect();

    for algorithm in ALL {
        let selector = build(algorithm);
        selector.apply(sets[0].clone());
        // Index of the last set whose apply completed.
        let applied = AtomicUsize::new(0);
        let filter: NodeFilter = Arc::new(|node: &Node| !node.address.ends_with("3:80"));
        let started = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for (index, set) in sets.iter().enumerate().skip(1) {
                    selector.apply(set.clone());
                    applied.store(index, Ordering::SeqCst);
                    std::thread::yield_now();
                }
            });
            for thread in 0..THREADS {
                let (selector, sets, applied, filter) = (&selector, &sets, &applied, &filter);
                scope.spawn(move || {
                    let mut held = Vec::new();
                    for pick in 0..PICKS {
                        let filters = if pick % 3 == 0 {
                            std::slice::from_ref(filter)
                        } else {
                            &[]
                        };
                        let before = applied.load(Ordering::SeqCst);
                        let result = selector.select(filters);
                        let after = applied.load(Ordering::SeqCst);
                        let Ok((node, done)) = result else { continue };
                        let last = (after + 1).min(SETS - 1);
                        let known = sets[before..=last].iter().any(|set| {
                            set.iter()
                                .any(|n| n.address == node.address && n.tls == node.tls)
                        });
                        assert!(known, "{algorithm}: {node:?} not in sets {before}..={last}");
                        if filters.len() == 1 {
                            assert!(!node.address.ends_with("3:80"), "filter ignored");
                        }
                        match (pick + thread) % 4 {
                            0 => held.push(done),
                            1 => drop(done),
                            2 => done.done(FAILED),
                            _ => done.done(OK),
                        }
                        if held.len() > 8 {
                            held.clear();
                        }
                    }
                });
            }
        });
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stress took too long"
        );
        let last: Vec<&str> = sets[SETS - 1].iter().map(|n| n.address.as_str()).collect();
        assert_eq!(addresses(&selector.nodes()), last, "{algorithm}");
    }

    // Balanced in-flight accounting for p2c under the same load.
    let selector = Arc::new(P2c::default());
    selector.apply(nodes(&["a:1", "b:1", "c:1"]));
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let selector = &selector;
            scope.spawn(move || {
                for pick in 0..PICKS {
                    let (_, done) = selector.select(&[]).expect("a node");
                    if (pick + thread) % 2 == 0 {
                        done.done(OK);
                    }
                }
            });
        }
        scope.spawn(|| {
            for round in 0..100 {
                if round % 2 == 0 {
                    selector.apply(nodes(&["a:1", "b:1", "c:1", "d:1"]));
                } else {
                    selector.apply(nodes(&["a:1", "b:1", "c:1"]));
                }
            }
        });
    });
    for address in ["a:1", "b:1", "c:1"] {
        let stats = selector.stats(address).expect("stats");
        assert_eq!(stats.in_flight(), 0, "{address}");
    }
}
