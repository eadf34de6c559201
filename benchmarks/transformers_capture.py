"""Capture time per transformer family (HuggingFace small configs, offline, and the hand-written GPT):
front end chosen by ``auto``, time of ``--capture export`` (export + normalisation + shapes/costs +
eager check) and of ``auto`` (fx attempted first), nodes, call_module layers, coverage, eager error.

    python benchmarks/transformers_capture.py [--repeats 3] [--families bert,gpt2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.modelfile import load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default=",".join(list(zoo.HF_FAMILIES) + ["gpt"]))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    graphopt.capture(zoo.hf_model("vit"), zoo.hf_example_inputs("vit"), capture="export")  # warm-up (imports)
    for name in args.families.split(","):
        if name == "gpt":
            spec = load_model_file(ROOT / "examples" / "gpt.py")
            model, inputs, label = spec.module, spec.example_inputs, "hand-written GPT (examples/gpt.py)"
        else:
            model, inputs = zoo.hf_model(name), zoo.hf_example_inputs(name)
            label = f"hf:{name} ({type(model).__name__})"
        t_exp, all_exp, gm = timed(lambda: graphopt.capture(model, inputs, capture="export"), args.repeats)
        t_auto, all_auto, ga = timed(lambda: graphopt.capture(model, inputs), 1)
        meta, ameta = gm.meta["graphopt"], ga.meta["graphopt"]
        mods = sum(1 for n in gm.graph.nodes if n.op == "call_module")
        rows.append({"model": label, "auto_front_end": ameta["front_end"]["used"],
                     "auto_reason": ameta["front_end"]["reason"], "export_s": t_exp, "export_s_all": all_exp,
                     "auto_s": t_auto, "nodes": len(gm.graph.nodes), "call_module": mods,
                     "coverage": meta["cost"].coverage["fraction"], "eager_rel_error": meta["eager_check"]["rel_error"],
                     "params": meta["cost"].params})
        print(rows[-1], flush=True)
    md = ("| model | auto picks | capture=export s (median) | auto s | nodes | call_module | coverage | "
          "eager rel. error |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + "".join(
              f"| {r['model']} | {r['auto_front_end']} | {r['export_s']:.2f} | {r['auto_s']:.2f} | {r['nodes']} | "
              f"{r['call_module']} | {r['coverage']:.2f} | {r['eager_rel_error']:.1e} |\n" for r in rows))
    md += ("\nSmall configs (hidden 64, 2 layers, 4 heads), batch 2, sequence 8 (GPT: 4x32). `auto` tries torch.fx "
           "first; on every HuggingFace model it fails at the root, so auto's time includes that attempt. "
           "Times on a shared 2-core CPU: compare rows, not machines.\n")
    folder = write_results("transformers_capture", {"environment": environment(), "rows": rows}, md)
    print(md)
    print(f"wrote {folder}/transformers_capture.json")


if __name__ == "__main__":
    main()
