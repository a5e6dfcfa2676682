//! Cost of one `select` + `Done::done` per algorithm and node count.

// `criterion_group!` generates a public function without docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use selector::{Algorithm, DoneInfo, Node, NodeFilter, Selector, build};

const ALGORITHMS: [Algorithm; 3] = [Algorithm::P2c, Algorithm::Wrr, Algorithm::Random];
const OK: DoneInfo = DoneInfo { success: true };

fn selector_with(algorithm: Algorithm, count: usize) -> Arc<dyn Selector> {
    let selector = build(algorithm);
    selector.apply(
        (0..count)
            .map(|i| Node {
                weight: Some(1 + (i as i64 % 5)),
                ..Node::new(format!("10.0.{}.{}:8080", i / 250, i % 250))
            })
            .collect(),
    );
    selector
}

fn pick_and_done(selector: &dyn Selector, filters: &[NodeFilter]) {
    let (node, done) = selector.select(filters).expect("a node");
    black_box(&node);
    done.done(OK);
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("select+done");
    for algorithm in ALGORITHMS {
        for count in [2, 10, 100] {
            let selector = selector_with(algorithm, count);
            group.bench_with_input(
                BenchmarkId::new(algorithm.as_str(), count),
                &selector,
                |b, selector| b.iter(|| pick_and_done(&**selector, &[])),
            );
        }
    }
    group.finish();
}

fn filtered(c: &mut Criterion) {
    let mut group = c.benchmark_group("select+done/one-filter");
    let filters: [NodeFilter; 1] = [Arc::new(|node: &Node| !node.address.ends_with(".1:8080"))];
    for algorithm in ALGORITHMS {
        let selector = selector_with(algorithm, 10);
        group.bench_with_input(
            BenchmarkId::new(algorithm.as_str(), 10),
            &selector,
            |b, selector| b.iter(|| pick_and_done(&**selector, &filters)),
        );
    }
    group.finish();
}

/// Two threads picking from the same selector; time per pick of one thread.
fn contended(c: &mut Criterion) {
    const THREADS: u64 = 2;
    let mut group = c.benchmark_group("select+done/2-threads");
    for algorithm in ALGORITHMS {
        let selector = selector_with(algorithm, 10);
        group.bench_with_input(
            BenchmarkId::new(algorithm.as_str(), 10),
            &selector,
            |b, selector| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for _ in 0..THREADS {
                            scope.spawn(|| {
                                for _ in 0..iters {
                                    pick_and_done(&**selector, &[]);
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = single_thread, filtered, contended
}
criterion_main!(benches);
