"""CPU numerics of the precision passes: errors against float64 next to torch.autocast's, and casts.

For each model and pass spec, runs the pass with verification and collects what its check
measured: relative L2 error of outputs and of all gradients (inputs + parameters, fixed random
cotangent) against a float64 reference, for float32 eager, torch.autocast (CPU) and graphopt's
graph; the casts in the graph (inserted/removed/after) and aten._to_copy calls per forward.
No timings: half precision is slow on this CPU by design (see precision_gpu.py for speed).

    python benchmarks/precision_numerics.py   # -> benchmarks/results/cpu/precision_numerics.{json,md}
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402
from precision_models import Block, calibrate_bn  # noqa: E402

SPECS = ["mixed_precision", "mixed_precision:dtype=bfloat16", "cast", "cast:dtype=bfloat16"]


def models():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    yield "resnet18 (64x64, batch 2)", calibrate_bn(zoo.build("resnet18").eval(), x), x
    torch.manual_seed(0)
    yield "mobilenet_v2 (64x64, batch 2)", calibrate_bn(zoo.build("mobilenet_v2").eval(), x), x
    torch.manual_seed(0)
    vit = zoo.build("vit_b_16", image_size=32).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    yield "vit_b_16 (32x32, batch 2)", vit, torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    yield "transformer block (d=32, 6 tokens, batch 2)", Block().eval(), torch.randn(2, 6, 32)


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for name, model, x in models():
        for spec in SPECS:
            t0 = time.perf_counter()
            gm, report = graphopt.optimize(model, (x,), [spec])
            rec = report.records[0]
            d = rec.verification.details["precision"]
            rows.append({"model": name, "spec": spec, "verification": rec.verification.status,
                         "rel_l2_vs_float32_graph": rec.verification.value, "budget": rec.verification.limit,
                         "reference": d["reference"], "float32": d["float32"], "graphopt": d["graphopt"],
                         "autocast": d.get("autocast"), "ratio_to_autocast": d.get("ratio_to_autocast"),
                         "casts": rec.notes["casts"], "runtime_casts_per_forward": d["runtime_casts_per_forward"],
                         "declined": len(rec.declined), "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:45s} {spec:32s} graphopt {d['graphopt']} autocast {d.get('autocast')}", flush=True)
    meta = {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": [round(v, 2) for v in os.getloadavg()], "threads": 1}
    out = ROOT / "benchmarks" / "results" / "cpu"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "precision_numerics.json", {**meta, "rows": rows})
    lines = ["# Precision passes: numerics on CPU", "",
             f"{meta['device']}, torch {meta['torch']}, {meta['date']}, load average {meta['loadavg']}. "
             "Relative L2 error against a float64 run of the original model (outputs; gradients wrt "
             "inputs and all parameters for a fixed random cotangent), eval mode. autocast = "
             "`torch.autocast('cpu', dtype)` on the original model. Casts: nodes in graphopt's graph; "
             "runtime = `aten._to_copy` calls in one forward.", "",
             "| model | pass | graphopt out / grads | autocast out / grads | float32 out / grads | casts in graph (inserted/removed/after) | runtime casts graphopt / autocast |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ac = r["autocast"] or {}
        c = r["casts"]
        rc = r["runtime_casts_per_forward"]
        lines.append(f"| {r['model']} | `{r['spec']}` | {r['graphopt']['outputs']:.2e} / {r['graphopt']['grads']:.2e} | "
                     f"{ac.get('outputs', float('nan')):.2e} / {ac.get('grads', float('nan')):.2e} | "
                     f"{r['float32']['outputs']:.1e} / {r['float32']['grads']:.1e} | "
                     f"{c['inserted']}/{c['removed']}/{c['after']} | {rc.get('graphopt')} / {rc.get('autocast')} |")
    (out / "precision_numerics.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/precision_numerics.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
