"""Small models for the precision-pass tests (importable, so emitted folders can be reloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A pre-LayerNorm transformer block: nn.MultiheadAttention (batch_first) + GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SdpaBlock(nn.Module):
    """Attention written with functional ops (timm/nanoGPT style): matmul, softmax, sdpa."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
        y2 = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        return x + self.proj(y + y2) * self.gamma


class NoHeavy(nn.Module):
    """Nothing compute-heavy: the mixed-precision rule must not fire."""

    def forward(self, x):
        return torch.relu(x).mean(dim=1) * 2.0


class UserCasts(nn.Module):
    """A model written for autocast: explicit casts the rewrite makes redundant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = x.float()  # already float32
        h = self.conv(x)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        logits = self.fc(h).float()  # "make sure the logits are float32"
        return torch.log_softmax(logits, dim=1).to(torch.float32)


class Tiny(nn.Module):
    """Linear layers whose outputs are ~1e-9: below float16's smallest subnormal (6e-8)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                fc.weight.mul_(1e-4)
                fc.bias.zero_()

    def forward(self, x):
        return self.fc2(self.fc1(x))


def calibrate_bn(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Run a few train-mode batches so BatchNorm statistics normalise activations (as in a
    trained network); random-init running stats (mean 0, var 1) make deep nets' outputs
    shrink to ~1e-10, which float16 flushes to zero."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(x.shape, generator=gen))
    return model.eval()


def small_vit() -> nn.Module:
    """torchvision's VisionTransformer class (the vit_b_16 code) at a test-sized width/depth."""
    from graphopt.zoo import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    m = tv.models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                       hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    return m.eval()
