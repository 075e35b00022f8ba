"""Every full run in bench/results/ side by side: how each bar row moves between runs.

    .venv/bin/python bench/history.py [--since 2026-12-03T23:00]
    .venv/bin/python bench/history.py --run [FILE]   # one run's tables (default: the newest)

A full run is `--large` with every scenario (make bench ARGS="--large ..."). This VM's
speed drifts by tens of percent between runs, on both servers, so one run cannot say
whether a row that misses its bar by a few percent is a tie or a loss; the spread of
the same row over many runs can. Prints Markdown tables (bench/README.md), as does
`--run`: one run against the peer, its CPU per request and its fractions of PostgreSQL's
own limit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson
from load import BY_NAME, READS
from run import LIMITS, READ_P99_MS, WRITES, _bar, needed_ratio

RESULTS = Path(__file__).resolve().parent / "results"
BAR_ROWS = [name for name in BY_NAME if needed_ratio(name) is not None]


def full_runs(since: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(RESULTS.glob("20*.json")):
        run = orjson.loads(path.read_bytes())
        config = run.get("config", {})
        full = config.get("large") and len(config.get("only", ())) >= len(BY_NAME) + 2
        if full and run["started_at"] >= since:
            run["file"] = path.name
            runs.append(run)
    return sorted(runs, key=lambda r: r["started_at"])


def rows(run: dict[str, Any], workers: int) -> dict[str, dict[str, Any]]:
    return {
        r["scenario"]: r
        for r in run["summary"]
        if r["workers"] == workers and "units_per_s" in r["crmsync"] and "ratio" in r
    }


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:{fmt}} / {mid:{fmt}} / {high:{fmt}}"


def per_row_table(runs: list[dict[str, Any]], workers: int) -> None:
    print(f"\n#### {workers} worker(s): each bar row over {len(runs)} full runs\n")
    print(
        "| scenario | ratio min / median / max | ratio bar met | crmsync p99 ms min / median / max"
        " | p99 < 50 ms |"
    )
    print("|---|---|---|---|---|")
    by_run = [rows(run, workers) for run in runs]
    for name in BAR_ROWS:
        found = [by_name[name] for by_name in by_run if name in by_name]
        ratios = [r["ratio"] for r in found]
        need = needed_ratio(name) or 0.0
        cells = [BY_NAME[name].title, spread(ratios, ".2f")]
        cells.append(f"{sum(x >= need for x in ratios)} of {len(found)} (>= {need:.1f}x)")
        if name in READS:
            p99 = [r["crmsync"]["p99_ms"] for r in found]
            cells += [spread(p99, ".1f"), f"{sum(x < READ_P99_MS for x in p99)} of {len(found)}"]
        else:
            cells += ["-", "-"]
        print(f"| {' | '.join(cells)} |")


def per_run_table(runs: list[dict[str, Any]]) -> None:
    print("\n#### Each full run: the bars, at 1 worker · 2 workers\n")
    print(
        "| started (UTC) | commit | reads >= 1.0x | uploads + sync >= 2x | 1000 new / COPY"
        " | reads p99 < 50 ms |"
    )
    print("|---|---|---|---|---|---|")
    for run in runs:
        cells: list[list[str]] = [[], [], [], []]
        copy = run.get("physical", {}).get("copy", {}).get("rows_per_s")
        for workers in (1, 2):
            by_name = rows(run, workers)
            reads = [by_name[n] for n in READS if n in by_name]
            writes = [by_name[n] for n in WRITES if n in by_name]
            for i, rows_of in enumerate((reads, writes)):
                met = sum(r["ratio"] >= (needed_ratio(r["scenario"]) or 0.0) for r in rows_of)
                cells[i].append(f"{met}/{len(rows_of)}")
            new = by_name.get("upload_1000_new")
            cells[2].append(f"{new['crmsync']['units_per_s'] / copy:.1%}" if new and copy else "-")
            p99_met = sum(r["crmsync"]["p99_ms"] < READ_P99_MS for r in reads)
            cells[3].append(f"{p99_met}/{len(reads)}")
        commit = run.get("machine", {}).get("crmsync_commit", "")[:7]
        started = run["started_at"][:16].replace("T", " ")
        print(f"| {started} | `{commit}` | " + " | ".join(" · ".join(c) for c in cells) + " |")


def run_tables(run: dict[str, Any]) -> None:
    """One run's tables as bench/README.md shows them: against the peer, CPU per request,
    and against PostgreSQL itself."""
    by = {(r["scenario"], r["workers"]): r for r in run["summary"]}
    titles = {n: s.title for n, s in BY_NAME.items()}
    titles["first_sync"] = "first sync of a phone (5k contacts, 30k calls)"
    print(
        f"{run['file']}: {run['started_at'][:16]} - {run['finished_at'][11:16]} UTC at "
        f"`{run['machine']['crmsync_commit'][:7]}`\n"
    )
    print(
        "| scenario | 1 worker: crmsync / Express | ratio | p50 / p99 ms, crmsync vs Express"
        " | bar | 2 workers: crmsync / Express | ratio | p50 / p99 ms | bar |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [*BY_NAME, "first_sync"]:
        cells = [titles[name]]
        for workers in (1, 2):
            row = by.get((name, workers))
            if row is None or "ratio" not in row:
                cells += ["-"] * 4
                continue
            a, b = row["crmsync"], row["express"]
            if "seconds" in a:
                cells += [f"{a['seconds']:.2f} / {b['seconds']:.2f} s", f"{row['ratio']:.2f}x"]
                cells += ["-", "-"]
                continue
            unit = {"req": "req/s", "call": "calls/s"}.get(BY_NAME[name].unit, "/s")
            cells.append(f"{a['units_per_s']:,.0f} / {b['units_per_s']:,.0f} {unit}")
            cells.append(f"{row['ratio']:.2f}x")
            cells.append(
                f"{a['p50_ms']:.0f}/{a['p99_ms']:.0f} vs {b['p50_ms']:.0f}/{b['p99_ms']:.0f}"
            )
            cells.append(_bar(name, a, b).replace("MISS", "miss"))
        print(f"| {' | '.join(cells)} |")
    print(
        "\n| scenario | 1 worker: crmsync server + PostgreSQL | Express server + PostgreSQL"
        " | 2 workers: crmsync | Express |"
    )
    print("|---|---|---|---|---|")
    for name in BY_NAME:
        cells = [titles[name]]
        for workers in (1, 2):
            row = by.get((name, workers), {})
            for side in (row.get("crmsync", {}), row.get("express", {})):
                if "server_cpu_ms" not in side:
                    cells.append("-")
                    continue
                server, pg = side["server_cpu_ms"], side["postgres_cpu_ms"]
                cells.append(f"{server:.2f} + {pg:.2f} = {server + pg:.2f} ms")
        print(f"| {' | '.join(cells)} |")
    physical = run.get("physical", {})
    limits = {
        "copy": "COPY of the seeded call rows into `LIKE call_logs INCLUDING ALL`",
        "list": "pgbench `-c 32`, the contact list SQL (random page + total)",
        "search": "pgbench `-c 32`, the name search SQL",
    }
    print("\n| limit | PostgreSQL | crmsync, 1 worker | 2 workers |")
    print("|---|---|---|---|")
    for scenario, key, field, _ in LIMITS:
        limit = physical.get(key, {}).get(field)
        if not limit:
            continue
        cells = [limits[key], f"{limit:,.0f} {'rows/s' if key == 'copy' else 'tps'}"]
        for workers in (1, 2):
            mine = by.get((scenario, workers), {}).get("crmsync", {}).get("units_per_s")
            cells.append(f"{mine / limit:.1%}" if mine else "-")
        print(f"| {' | '.join(cells)} |")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--since", default="", help="only runs started at or after this UTC time")
    p.add_argument("--run", nargs="?", const="", help="one run's tables (default: the newest)")
    args = p.parse_args(argv)
    runs = full_runs(args.since)
    if not runs:
        print("no full runs in bench/results/", file=sys.stderr)
        return 1
    if args.run is not None:
        chosen = [r for r in runs if r["file"] == Path(args.run).name] if args.run else runs[-1:]
        if not chosen:
            print(f"{args.run}: not a full run in bench/results/", file=sys.stderr)
            return 1
        run_tables(chosen[0])
        return 0
    per_run_table(runs)
    for workers in (1, 2):
        per_row_table(runs, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
