//! Lookup cost at 10, 1,000 and 10,000 routes (a third each exact, restful, prefix).
//!
//! Each iteration looks up the next of 1,024 precomputed request paths of one kind
//! (`exact`, `param`, `prefix`, or `miss` for a 404). Two spreads:
//! - `hot`: the paths hit 3 services, so the table's size is all that changes (the
//!   algorithmic cost: it should not grow with the table);
//! - `spread`: the paths hit services all over the table, so bigger tables also pay
//!   for cache misses in the tree, as a busy gateway would.

// `criterion_group!` generates a public function without docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use router::{MuxRouter, RouteMatch, Router};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// `size` routes over `size / 3` services: exact, constrained restful and prefix routes.
fn table(size: usize) -> MuxRouter<usize> {
    let mut router = MuxRouter::new();
    for id in 0..size {
        let service = id / 3;
        let (pattern, method) = match id % 3 {
            0 => (format!("/svc{service}/v1/items/list"), "GET"),
            1 => (format!("/svc{service}/v1/items/{{id:[0-9]+}}"), "GET"),
            _ => (format!("/svc{service}/static/*"), ""),
        };
        if let Err(error) = router.handle(&pattern, method, "", id, None) {
            panic!("register {pattern}: {error}");
        }
    }
    router
}

/// 1,024 request paths of one kind over the first `spread` services (a fixed LCG).
fn paths(size: usize, kind: &str, spread: usize) -> Vec<String> {
    let services = (size / 3).clamp(1, spread);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..1_024)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let service = (state >> 33) as usize % services;
            match kind {
                "exact" => format!("/svc{service}/v1/items/list"),
                "param" => format!("/svc{service}/v1/items/{}", state % 100_000),
                "prefix" => format!("/svc{service}/static/css/site/app.css"),
                _ => format!("/svc{service}/v2/unknown"),
            }
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for size in SIZES {
        let router = table(size);
        for (spread_name, spread) in [("hot", 3), ("spread", usize::MAX)] {
            for kind in ["exact", "param", "prefix", "miss"] {
                let paths = paths(size, kind, spread);
                // The paths must reach the kind of route they are meant to exercise.
                let expect_found = kind != "miss";
                for path in &paths {
                    let found = matches!(router.route("GET", "", path), RouteMatch::Found(_));
                    assert_eq!(found, expect_found, "{path}");
                }
                let id = BenchmarkId::new(format!("{spread_name}/{kind}"), size);
                group.bench_with_input(id, &paths, |b, paths| {
                    let mut next = 0usize;
                    b.iter(|| {
                        next = (next + 1) & 1_023;
                        black_box(router.route(
                            black_box("GET"),
                            black_box("api.example.com:8080"),
                            black_box(paths[next].as_str()),
                        ))
                    });
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
