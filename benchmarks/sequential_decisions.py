"""How often the engine's sequential decision keeps a candidate, by simulation (no model is run).

The engine (``graphopt.bench.measure.paired_rounds``) looks at the paired per-round ratios after every
round from 3 to ``--rounds`` and keeps a candidate the first time it is decided faster. This script
feeds it simulated rounds: per-round log-ratios normal with standard deviation ``noise`` around
``log(true ratio)``, for candidates with no gain (ratio 1.0: every keep is a false keep) and with real
gains, and reports the share kept and the mean number of rounds, for the engine's rule (per-look
level from ``sequential_confidence``) and for the former rule (the nominal 95% interval at every
look). Deterministic (seeded). Writes ``benchmarks/results/cpu/sequential_decisions.{md,json}``.

    python benchmarks/sequential_decisions.py            # 2,000 runs per cell, ~6 min
    python benchmarks/sequential_decisions.py --runs 200 # quick
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphopt.bench.measure import UNDECIDED, paired_rounds, paired_verdict, sequential_confidence  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu"


def engine(true: float, noise: float, rounds: int, rng: random.Random) -> tuple[str, int]:
    sd = noise / math.sqrt(2)  # each runner's own noise; the ratio's log then has sd `noise`
    runners = {"candidate": lambda: (true * math.exp(rng.gauss(0, sd)), 0.0),
               "baseline": lambda: (math.exp(rng.gauss(0, sd)), 0.0)}
    out = paired_rounds(runners, "baseline", rounds=rounds)
    return out.comparisons["candidate"].verdict, out.rounds


def nominal(true: float, noise: float, rounds: int, rng: random.Random) -> tuple[str, int]:
    """The former rule: the same looks, the 95% interval at each."""
    ratios: list[float] = []
    v = UNDECIDED
    for _ in range(rounds):
        ratios.append(true * math.exp(rng.gauss(0, noise)))
        v = paired_verdict(ratios)
        if v != UNDECIDED:
            break
    return v, len(ratios)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    rows = []
    for noise in (0.01, 0.03, 0.06):
        for true in (1.0, 0.97, 0.95, 0.9):
            row = {"noise": noise, "true_ratio": true}
            for name, rule in (("engine", engine), ("nominal_every_look", nominal)):
                rng = random.Random(f"{noise}-{true}-{name}")
                res = [rule(true, noise, a.rounds, rng) for _ in range(a.runs)]
                row[name] = {"kept": sum(v == "faster" for v, _ in res) / a.runs,
                             "mean_rounds": sum(n for _, n in res) / a.runs}
            rows.append(row)
            print(f"noise {noise:.0%} true {true:.2f}: engine kept {row['engine']['kept']:.2%} "
                  f"({row['engine']['mean_rounds']:.1f} rounds), nominal kept {row['nominal_every_look']['kept']:.2%} "
                  f"({row['nominal_every_look']['mean_rounds']:.1f} rounds)", flush=True)
    look = sequential_confidence(0.95, 3, a.rounds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sequential_decisions.json", {"runs": a.runs, "rounds": a.rounds, "min_rounds": 3,
                                                   "decision_confidence": look, "rows": rows})
    lines = ["# Sequential decisions: share of candidates kept (simulated rounds)", "",
             f"{a.runs} simulated comparisons per cell, looks after every round from 3 to {a.rounds}, per-round "
             f"log-ratio normal with the given noise (standard deviation). Engine: keep decisions at the per-look "
             f"level {look:.4%} (`sequential_confidence(0.95, 3, {a.rounds})`); former rule: the 95% interval "
             "at every look. With true ratio 1.00 every keep is a false keep (target: 2.5%).", "",
             "| noise | true ratio | engine: kept | engine: mean rounds | former rule: kept | former: mean rounds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['noise']:.0%} | {r['true_ratio']:.2f} | {r['engine']['kept']:.2%} | "
                     f"{r['engine']['mean_rounds']:.1f} | {r['nominal_every_look']['kept']:.2%} | "
                     f"{r['nominal_every_look']['mean_rounds']:.1f} |")
    (out / "sequential_decisions.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'sequential_decisions.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
