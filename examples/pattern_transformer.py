"""A small transformer classifier on a synthetic task that needs attention (offline, seeded):
does the sequence contain the token 5 immediately followed by the token 9? Positives have the
bigram planted at a random position; negatives have every 5 -> 9 broken, so single-token counts
barely differ and a bag of tokens is not enough. Multi-head self-attention with the head width
as a literal, so ``prune`` removes whole heads (q/k/v rows, o columns) and MLP hidden units.

    graphopt train examples/pattern_transformer.py --optimizer adamw --lr 0.003 --epochs 8
    graphopt train examples/pattern_transformer.py -p prune:macs=0.5,reconstruct=8 --distill ...
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, LENGTH, WIDTH, HEADS, LAYERS = 16, 24, 64, 4, 2
A, B = 5, 9  # the planted bigram


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = F.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PatternTransformer(nn.Module):
    def __init__(self, vocab: int = VOCAB, length: int = LENGTH, width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, classes: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, classes)
        self.register_buffer("positions", torch.arange(length), persistent=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(self.positions)
        return self.head(self.ln(self.blocks(x)).mean(1))


def make_data(n: int, seed: int, length: int = LENGTH, vocab: int = VOCAB) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    for _ in range(length):  # break every A -> B (replace the B by another token, not A or B)
        hit = (x[:, :-1] == A) & (x[:, 1:] == B)
        if not hit.any():
            break
        other = torch.randint(1, vocab - 2, (int(hit.sum()),), generator=g)
        other = other + (other >= min(A, B)).long()
        other = other + (other >= max(A, B)).long()
        x[:, 1:][hit] = other
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, length - 1, (n,), generator=g)
    rows = torch.nonzero(y == 1).flatten()
    x[rows, where[rows]] = A
    x[rows, where[rows] + 1] = B
    return torch.utils.data.TensorDataset(x, y)


def model():
    torch.manual_seed(0)
    return PatternTransformer()


def example_inputs():
    return (make_data(32, seed=123).tensors[0],)


def data():
    return make_data(6000, seed=0), make_data(1000, seed=1)
