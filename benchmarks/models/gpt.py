"""A GPT-style decoder: examples/gpt.py's hand-written GPT (causal self-attention, pre-LayerNorm, tied
embeddings) at width 256, 4 layers, 4 heads, context 64, vocab 1024, batch 8.

    graphopt optimize benchmarks/models/gpt.py -o out/gpt
"""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location("_graphopt_example_gpt", Path(__file__).resolve().parents[2]
                                               / "examples" / "gpt.py")
_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gpt)

VOCAB, CONTEXT = 1024, 64


def model():
    torch.manual_seed(0)
    return _gpt.GPT(vocab=VOCAB, context=CONTEXT, width=256, heads=4, layers=4)


def example_inputs():
    return (torch.randint(0, VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(0)),)


def loss(output, target):
    """Next-token cross-entropy against the target: token ids, or (the benchmarks' synthetic target, a
    random tensor shaped like the logits) soft next-token distributions."""
    logits = output.reshape(-1, output.shape[-1])
    if target.is_floating_point():
        return F.cross_entropy(logits, target.reshape(-1, output.shape[-1]).softmax(-1))
    return F.cross_entropy(logits, target.reshape(-1))
