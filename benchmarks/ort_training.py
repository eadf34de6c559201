"""ORT training step vs PyTorch training step on this CPU (one thread each), same graph, same batch.

    python benchmarks/ort_training.py [--steps 20] [--out benchmarks/results/cpu]

For each model: the graph is captured, emitted with ``--emit ort`` (AdamW, torch semantics), and
one training step (forward + loss + backward + optimizer) is timed alternately in ORT
(``OrtTrainBackend.train_step``, which includes the numpy hand-over and the BatchNorm statistics
write-back) and in PyTorch (eager, ``torch.optim.AdamW``), after warm-up. Reports medians and the
ratio, plus the machine load, since the machine is shared.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

import graphopt  # noqa: E402
import graphopt.ort as go  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self, c: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))


def models():
    yield "small_cnn", SmallCNN(), (32, 3, 32, 32)
    for name in ("resnet18", "mobilenet_v2"):
        m = zoo.build(name, num_classes=10)
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        yield name, m, (16, 3, 64, 64)


def bench(name, model, shape, steps, warmup, workdir):
    torch.manual_seed(0)
    x = torch.randn(shape)
    y = torch.randint(0, 10, (shape[0],))
    gm = graphopt.capture(model, (x,))
    opt = go.OptimizerSpec.create("adamw", lr=1e-3)
    art = go.emit_ort_artifacts(gm, Path(workdir) / name, optimizer=opt, inputs=(x,), check=False, force=True)
    be = go.OrtTrainBackend(art, threads=1)
    ref = copy.deepcopy(gm).train()
    topt = opt.torch_optimizer(ref.parameters())

    def torch_step():
        topt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        topt.step()
        return loss.item()

    def ort_step():
        return be.train_step((x,), y, 1e-3)

    for _ in range(warmup):
        torch_step()
        ort_step()
    t_ort, t_torch = [], []
    for i in range(steps):  # alternate, and alternate which goes first
        order = (ort_step, torch_step) if i % 2 == 0 else (torch_step, ort_step)
        for fn in order:
            t0 = time.perf_counter()
            fn()
            (t_ort if fn is ort_step else t_torch).append(time.perf_counter() - t0)
    cost = gm.meta["graphopt"]["cost"]
    mo, mt = statistics.median(t_ort), statistics.median(t_torch)
    return {"model": name, "input": list(shape), "params": cost.params, "forward_macs": cost.macs,
            "ort_step_ms_median": mo * 1e3, "torch_step_ms_median": mt * 1e3,
            "ort_step_ms_iqr": [q * 1e3 for q in statistics.quantiles(t_ort, n=4)[::2]],
            "torch_step_ms_iqr": [q * 1e3 for q in statistics.quantiles(t_torch, n=4)[::2]],
            "ort_over_torch": mo / mt, "steps_timed": steps, "warmup": warmup}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, model, shape in models():
            rows.append(bench(name, model, shape, args.steps, args.warmup, work))
            r = rows[-1]
            print(f"{name:14s} ORT {r['ort_step_ms_median']:8.1f} ms  torch {r['torch_step_ms_median']:8.1f} ms  "
                  f"ORT/torch {r['ort_over_torch']:.2f}x", flush=True)
    doc = {"benchmark": "ORT training step vs PyTorch training step (AdamW, cross-entropy, 1 thread each)",
           "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores, shared machine)", "threads": 1,
           "torch_version": torch.__version__, "onnxruntime_version": onnxruntime.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ort_training.json", doc)
    lines = [f"# ORT training step vs PyTorch step ({doc['device']})", "",
             f"torch {doc['torch_version']}, onnxruntime-training {doc['onnxruntime_version']}, {doc['date']}, "
             f"1 thread each, load average before/after {load_before[0]:.2f}/{doc['loadavg_after'][0]:.2f} "
             "(machine shared with other jobs).", "",
             "One step = forward + cross-entropy + backward + AdamW update on the same batch; runs alternate "
             f"in one process after {args.warmup} warm-up steps; medians of {args.steps} steps (IQR in brackets).",
             "", "| model | input | ORT step (ms) | PyTorch step (ms) | ORT / PyTorch |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['ort_step_ms_median']:.1f} "
                     f"[{r['ort_step_ms_iqr'][0]:.1f}-{r['ort_step_ms_iqr'][1]:.1f}] | {r['torch_step_ms_median']:.1f} "
                     f"[{r['torch_step_ms_iqr'][0]:.1f}-{r['torch_step_ms_iqr'][1]:.1f}] | {r['ort_over_torch']:.2f}x |")
    lines += ["", "Not measured: GPU (no ORT training build on the GPU machine; ORT training here is CPU-only), "
              "multi-threaded runs."]
    (out / "ort_training.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
