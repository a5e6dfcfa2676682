#!/usr/bin/env python3
"""Turn the measurements of tests/bench/run into latest.md (tables) and latest.svg (bars).

usage: report.py RESULTS.tsv OUT.md OUT.svg

RESULTS.tsv has one line per measurement: GROUP, TARGET, METRIC, VALUE (tab-separated).
Groups: main, middleware, selector, routes, memory, tls, redis, tracing, h2, bodies (numbers);
meta, skip, note (text).
Every figure is shown as median [min–max] over the rounds.
"""

import statistics
import sys
from collections import defaultdict
from html import escape

TARGETS = ["direct", "nginx", "haproxy", "floor", "gateway"]
METRICS = [  # key, title, unit/format, better
    ("rps", "req/s", "int", "higher"),
    ("p50_ms", "p50 latency (ms)", "ms", "lower"),
    ("p99_ms", "p99 latency (ms)", "ms", "lower"),
    ("cpu_us", "proxy CPU per request (µs)", "us", "lower"),
    ("cpu_pct", "proxy CPU use during the run (%)", "pct", "—"),
    ("ir", "instructions per request (callgrind Ir)", "int", "lower"),
    ("other_pct", "CPU taken by other processes (% of a CPU)", "pct", "—"),
]
NO_RATIO = ("cpu_pct", "other_pct")


def load(path):
    data = defaultdict(list)
    text = defaultdict(list)
    with open(path, encoding="utf-8") as results:
        for line in results:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            group, target, metric, value = parts
            if group in ("meta", "skip", "note"):
                text[group].append((target, value))
                continue
            try:
                data[(group, target, metric)].append(float(value))
            except ValueError:
                text["note"].append((f"{group}/{target}", f"unparsable {metric} value {value!r}"))
    return data, text


def fmt(value, kind):
    if value is None:
        return "—"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    if kind in ("us", "pct"):
        return f"{value:.1f}"
    if kind == "kib":
        return f"{value / 1024:,.1f}"
    return f"{value:g}"


def stat(values):
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def cell(values, kind):
    s = stat(values)
    if s is None:
        return "—"
    med, low, high = s
    if len(values) == 1:
        return fmt(med, kind)
    return f"{fmt(med, kind)} [{fmt(low, kind)}–{fmt(high, kind)}]"


def median(values):
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def main_section(data, out):
    present = [t for t in TARGETS if any(k[0] == "main" and k[1] == t for k in data)]
    if not present:
        out.append("No target was measured.\n")
        return present
    rounds = max(len(data[("main", t, "rps")]) for t in present)
    out.append(f"## Targets ({rounds} round(s); median [min–max])\n")
    head = "| target | " + " | ".join(title for _, title, _, _ in METRICS) + " | errors |"
    out.append(head)
    out.append("|" + "---|" * (len(METRICS) + 2))
    for t in present:
        cells = [cell(data[("main", t, key)], kind) for key, _, kind, _ in METRICS]
        errors = int(sum(data[("main", t, "errors")]))
        out.append(f"| {t} | " + " | ".join(cells) + f" | {errors} |")
    out.append("")
    out.append("direct has no proxy, so no proxy CPU or Ir. A proxy CPU use near 100% means the")
    out.append("proxy (CPU 1) was the bottleneck; well below it, CPU 0 (wrk + upstream) was.")
    busy = [t for t in present if (median(data[("main", t, "other_pct")]) or 0) > 10]
    if busy:
        out.append(f"\n**Warning:** other processes took more than 10% of a CPU during the runs of "
                   f"{', '.join(busy)}: req/s, latency and CPU µs/req are disturbed; Ir/req is not.")
    out.append("")

    out.append("### Ratios (medians)\n")
    out.append("| ratio | " + " | ".join(title for key, title, _, _ in METRICS if key not in NO_RATIO) + " |")
    out.append("|" + "---|" * (len(METRICS) - len(NO_RATIO) + 1))
    for a, b in (("gateway", "nginx"), ("gateway", "floor"), ("gateway", "haproxy"), ("floor", "nginx")):
        if a in present and b in present:
            cells = [ratio(median(data[("main", a, key)]), median(data[("main", b, key)]))
                     for key, _, _, _ in METRICS if key not in NO_RATIO]
            out.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    out.append("")

    for key, title, kind, better in METRICS:
        rows = [t for t in present if data[("main", t, key)]]
        if not rows:
            continue
        out.append(f"### {title}" + (f" — {better} is better" if better != "—" else "") + "\n")
        out.append("| target | median [min–max] | samples | gateway / target |")
        out.append("|---|---|---|---|")
        gw = median(data[("main", "gateway", key)])
        for t in rows:
            values = data[("main", t, key)]
            out.append(f"| {t} | {cell(values, kind)} | {len(values)} | {ratio(gw, median(values))} |")
        out.append("")

    ir_rows = [t for t in present if len(data[("main", t, "ir")]) >= 2]
    if ir_rows:
        out.append("### Ir/request repeatability (two callgrind samples in one process)\n")
        out.append("| target | sample 1 | sample 2 | spread |")
        out.append("|---|---|---|---|")
        for t in ir_rows:
            a, b = data[("main", t, "ir")][:2]
            spread = abs(a - b) / ((a + b) / 2) * 100
            out.append(f"| {t} | {a:,.0f} | {b:,.0f} | {spread:.2f}% |")
        out.append("")
        out.append("Ir counts the proxy's user-space instructions only, not the kernel's work for its")
        out.append("syscalls; CPU µs/req covers both but depends on load and batching.\n")
    return present


def scenario_table(data, out, group, title, variants, columns, baseline=None, ratio_of=None):
    """One row per variant; with ratio_of (a, b), a last row of the medians' ratios a / b."""
    rows = [v for v in variants if any(k[0] == group and k[1] == v for k in data)]
    if not rows:
        return
    out.append(f"### {title}\n")
    heads = [c[1] for c in columns]
    if baseline:
        heads.append(f"req/s vs {baseline[1]}")
    out.append(f"| {variants_title(group)} | " + " | ".join(heads) + " |")
    out.append("|" + "---|" * (len(heads) + 1))
    base = median(data[(group, baseline[0], "rps")]) if baseline else None
    for v in rows:
        cells = [fmt(sum(data[(group, v, key)]), kind) if key == "errors" else cell(data[(group, v, key)], kind)
                 for key, _, kind in columns]
        if baseline:
            cells.append(ratio(median(data[(group, v, "rps")]), base))
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    if ratio_of and all(v in rows for v in ratio_of):
        a, b = ratio_of
        cells = ["" if key == "errors" or key in NO_RATIO else
                 ratio(median(data[(group, a, key)]), median(data[(group, b, key)])) for key, _, _ in columns]
        if baseline:
            cells.append("")
        out.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    out.append("")


def variants_title(group):
    return {"middleware": "config", "selector": "selector", "routes": "endpoints", "memory": "target",
            "tls": "target", "redis": "ratelimit bucket", "tracing": "config", "h2": "target",
            "bodies": "through"}[group]


def scenarios(data, out):
    load_cols = [("rps", "req/s", "int"), ("p50_ms", "p50 ms", "ms"), ("p99_ms", "p99 ms", "ms"),
                 ("cpu_us", "CPU µs/req", "us"), ("errors", "errors", "int")]
    if any(k[0] in ("middleware", "selector", "routes", "memory", "tls", "redis", "tracing", "h2", "bodies")
           for k in data):
        out.append("## Gateway scenarios\n")
    scenario_table(data, out, "middleware", "Middleware chain (logging, cors, ratelimit, rewrite) vs bare",
                   ["bare", "chain"], load_cols + [("ir", "Ir/req", "int")], ("bare", "bare"))
    scenario_table(data, out, "tracing", "tracing middleware (every request sampled, exported) vs bare",
                   ["bare", "tracing"], load_cols + [("ir", "Ir/req", "int")], ("bare", "bare"))
    scenario_table(data, out, "redis", "ratelimit (never refusing) with a local bucket vs its bucket in Redis",
                   ["local", "redis"], load_cols + [("ir", "Ir/req", "int")], ("local", "local"))
    scenario_table(data, out, "selector", "Selector with one upstream slowed (p2c vs wrr)",
                   ["p2c", "wrr"], load_cols, ("wrr", "wrr"))
    sizes = sorted({k[1] for k in data if k[0] == "routes"}, key=lambda s: int(s))
    scenario_table(data, out, "routes", "Endpoint count (requests match the last endpoint)", sizes,
                   [("start_ms", "start ms", "int"), ("reload_ms", "reload ms", "int")] + load_cols,
                   (sizes[0], sizes[0]) if sizes else None)
    if sizes:
        out.append("start: from exec to the first 200 on the last route; reload: from writing the new")
        out.append("file to the first 200 on its changed route, with `--reload-interval 100ms`.\n")
    memory_table(data, out, "memory", "keep-alive connections", TARGETS)
    tls_rows = ["nginx", "gateway"]
    scenario_table(data, out, "tls", "TLS keep-alive (same certificate, TLS 1.3, HTTP/1.1)",
                   [f"{t}-keepalive" for t in tls_rows], load_cols, ("nginx-keepalive", "nginx"))
    scenario_table(data, out, "tls", "TLS new handshakes (`Connection: close`: one request per connection)",
                   [f"{t}-handshake" for t in tls_rows], load_cols, ("nginx-handshake", "nginx"))
    memory_table(data, out, "tls", "TLS keep-alive connections", tls_rows)
    scenario_table(data, out, "h2", "HTTP/2 downstream (h2c prior knowledge, `h2load -c 10 -m 10`)",
                   ["nginx", "gateway"],
                   [("rps", "req/s", "int"), ("mean_ms", "mean ms", "ms"), ("p50_ms", "p50 ms", "ms"),
                    ("p99_ms", "p99 ms", "ms"), ("cpu_us", "CPU µs/req", "us"), ("cpu_pct", "proxy CPU %", "pct"),
                    ("ir", "Ir/req", "int"), ("other_pct", "others' CPU %", "pct"), ("errors", "errors", "int")],
                   ratio_of=("gateway", "nginx"))
    if any(k[0] == "h2" for k in data):
        out.append("Both proxies reach the upstream over HTTP/1.1 keep-alive. mean: h2load's own; p50/p99:")
        out.append("from its per-request log (request start to the end of its response).\n")
    bodies_tables(data, out)


def bodies_tables(data, out):
    """Large bodies: MiB/s and the proxy's RSS around each transfer, one table per direction."""
    for kind, what in (("down", "download"), ("up", "upload (PUT)")):
        mib = median(data[("bodies", "-", f"{kind}_mib")])
        rows = [t for t in ("direct", "nginx", "gateway") if data[("bodies", t, f"{kind}_errors")]]
        if not rows or mib is None:
            continue
        out.append(f"### Large bodies: {mib:,.0f} MiB {what}, streamed\n")
        out.append("| through | MiB/s | seconds | proxy CPU ms | RSS before MiB | RSS peak MiB | RSS growth MiB "
                   "| RSS after MiB | others' CPU % | failed |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in rows:
            key = lambda metric: data[("bodies", t, f"{kind}_{metric}")]  # noqa: E731
            before, peak = median(key("rss_before_kb")), median(key("rss_peak_kb"))
            # the peak restarts from the RSS of the moment it is reset, which may be a little
            # under the RSS read just before: no growth, not a negative one
            growth = [max(0, p - b) for p, b in zip(key("rss_peak_kb"), key("rss_before_kb"))]
            out.append(f"| {t} | {cell(key('mibps'), 'us')} | {cell(key('s'), 'ms')} | {cell(key('cpu_ms'), 'int')} "
                       f"| {fmt(before, 'kib')} | {fmt(peak, 'kib')} | {cell(growth, 'kib')} "
                       f"| {fmt(median(key('rss_after_kb')), 'kib')} | {cell(key('other_pct'), 'pct')} "
                       f"| {fmt(sum(key('errors')), 'int')} |")
        if "gateway" in rows and "nginx" in rows:
            speed = ratio(median(data[("bodies", "gateway", f"{kind}_mibps")]),
                          median(data[("bodies", "nginx", f"{kind}_mibps")]))
            cpu = ratio(median(data[("bodies", "gateway", f"{kind}_cpu_ms")]),
                        median(data[("bodies", "nginx", f"{kind}_cpu_ms")]))
            out.append(f"| gateway / nginx | {speed} | | {cpu} | | | | | | |")
        out.append("")
    if any(k[0] == "bodies" for k in data):
        out.append("direct: curl straight to the upstream, the ceiling. RSS peak: VmHWM, reset before each")
        out.append("transfer; a growth near the body's size would mean the proxy holds the whole body. MiB/s")
        out.append("counts the body over curl's total time; curl and the upstream share CPU 0.\n")


def memory_table(data, out, group, what, candidates):
    targets = [t for t in candidates if any(k[0] == group and k[1] == t for k in data)]
    if not targets:
        return
    conns = max(max(data[(group, t, "conns")] or [0]) for t in targets)
    out.append(f"### Memory: RSS idle and with {conns:,.0f} idle {what}\n")
    out.append("| target | RSS idle MiB | RSS with conns MiB | KiB per conn | RSS after close MiB | conns held |")
    out.append("|---|---|---|---|---|---|")
    for t in targets:
        idle = median(data[(group, t, "rss_idle_kb")])
        held = median(data[(group, t, "rss_conns_kb")])
        n = median(data[(group, t, "conns")])
        per = (held - idle) / n if idle is not None and held is not None and n else None
        after = median(data[(group, t, "rss_after_kb")])
        out.append(f"| {t} | {fmt(idle, 'kib')} | {fmt(held, 'kib')} | {fmt(per, 'us')} | "
                   f"{fmt(after, 'kib')} | {fmt(n, 'int')} |")
    out.append("")


def svg(data, present, path):
    panels = [(key, title, kind, better) for key, title, kind, better in METRICS
              if key not in NO_RATIO and any(data[("main", t, key)] for t in present)]
    width, height, top, bottom = 300, 300, 50, 40
    total_w = max(1, len(panels)) * width
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{total_w}" height="{height}" fill="white"/>']
    colors = {"direct": "#9e9e9e", "nginx": "#4caf50", "haproxy": "#2196f3", "floor": "#ff9800",
              "gateway": "#e91e63"}
    for i, (key, title, kind, better) in enumerate(panels):
        x0 = i * width
        rows = [(t, stat(data[("main", t, key)])) for t in present if data[("main", t, key)]]
        top_value = max(s[2] for _, s in rows) * 1.15 or 1
        plot_h = height - top - bottom
        bar_w = (width - 40) / max(1, len(rows))
        parts.append(f'<text x="{x0 + width / 2}" y="20" text-anchor="middle" font-size="13" '
                     f'font-weight="bold">{escape(title)}</text>')
        parts.append(f'<text x="{x0 + width / 2}" y="34" text-anchor="middle" fill="#555">'
                     f'{better} is better</text>')
        parts.append(f'<line x1="{x0 + 20}" y1="{height - bottom}" x2="{x0 + width - 20}" '
                     f'y2="{height - bottom}" stroke="#333"/>')
        for j, (t, (med, low, high)) in enumerate(rows):
            bx = x0 + 20 + j * bar_w + bar_w * 0.15
            bw = bar_w * 0.7
            h = plot_h * med / top_value
            y = height - bottom - h
            parts.append(f'<rect x="{bx:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                         f'fill="{colors.get(t, "#607d8b")}"/>')
            cx = bx + bw / 2
            y_low = height - bottom - plot_h * low / top_value
            y_high = height - bottom - plot_h * high / top_value
            parts.append(f'<line x1="{cx:.1f}" y1="{y_low:.1f}" x2="{cx:.1f}" y2="{y_high:.1f}" stroke="#000"/>')
            for yy in (y_low, y_high):
                parts.append(f'<line x1="{cx - 4:.1f}" y1="{yy:.1f}" x2="{cx + 4:.1f}" y2="{yy:.1f}" stroke="#000"/>')
            parts.append(f'<text x="{cx:.1f}" y="{min(y, y_high) - 4:.1f}" text-anchor="middle">'
                         f'{escape(fmt(med, kind))}</text>')
            parts.append(f'<text x="{cx:.1f}" y="{height - bottom + 14}" text-anchor="middle">{escape(t)}</text>')
    parts.append(f'<text x="6" y="{height - 6}" fill="#555">bars: median; whiskers: min–max over rounds</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as out:
        out.write("\n".join(parts) + "\n")


def main():
    results, md_path, svg_path = sys.argv[1:4]
    data, text = load(results)
    meta = dict(text["meta"])
    out = [f"# Gateway benchmark ({meta.get('mode', 'full')} run, {meta.get('date', '')})\n"]
    for key in ("commit", "binaries", "cpu", "kernel", "tools", "load", "gateway", "load before start", "elapsed"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    out.append("- pinning: upstream nginx and the load generator on CPU 0, the proxy on CPU 1, one worker")
    out.append("")
    present = main_section(data, out)
    scenarios(data, out)
    if text["skip"]:
        out.append("## Skipped\n")
        for what, why in text["skip"]:
            out.append(f"- **{what}**: {why}")
        out.append("")
    if text["note"]:
        out.append("## Notes\n")
        for what, why in text["note"]:
            out.append(f"- {what}: {why}")
        out.append("")
    with open(md_path, "w", encoding="utf-8") as md:
        md.write("\n".join(out))
    svg(data, present, svg_path)


if __name__ == "__main__":
    main()
