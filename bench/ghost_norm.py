"""Which per-sample norm of a linear layer's weight gradient is cheaper: explicit or ghost.

For inputs ``x [B, T, d_in]`` and output gradients ``g [B, T, d_out]`` the per-sample weight
gradient is ``G_b^T X_b``; its squared norm is either the explicit ``||bmm(g^T, x)||^2``
(``B*T*d_in*d_out`` multiply-adds, a ``[B, d_out, d_in]`` buffer) or the ghost norm
``<X X^T, G G^T>`` (``B*T*T*(d_in+d_out)``, two ``[B, T, T]`` buffers). The two rules of the
tree before issue 24 disagree between ``t*t`` and ``t*(d_in+d_out)``: this times both forms on
the layer shapes of the two backends (BIGRec's LoRA factors of SmolLM2-135M, TIGER's T5) at
the sequence lengths they meet, the median of ``--repeats`` runs on 1 thread.

    python bench/ghost_norm.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import time

import torch


def explicit(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.bmm(g.transpose(1, 2), x).pow(2).sum((1, 2))


def ghost(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def timed(fn, x, g, repeats: int) -> float:
    fn(x, g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, g)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


SHAPES = [  # (what, B, T, d_in, d_out)
    ("bigrec lora_A q/v (576->8)", 8, 16, 576, 8),
    ("bigrec lora_A q/v (576->8)", 8, 32, 576, 8),
    ("bigrec lora_A q/v (576->8)", 8, 48, 576, 8),
    ("bigrec lora_A q/v (576->8)", 8, 64, 576, 8),
    ("bigrec lora_A q/v (576->8)", 8, 128, 576, 8),
    ("bigrec lora_B q (8->576)", 8, 16, 8, 576),
    ("bigrec lora_B q (8->576)", 8, 32, 8, 576),
    ("bigrec lora_B q (8->576)", 8, 48, 8, 576),
    ("bigrec lora_B q (8->576)", 8, 64, 8, 576),
    ("bigrec lora_B q (8->576)", 8, 128, 8, 576),
    ("bigrec lora_B v (8->192)", 8, 64, 8, 192),
    ("tiger enc q/k/v (128->384)", 32, 80, 128, 384),
    ("tiger enc ffn wi (128->1024)", 32, 80, 128, 1024),
    ("tiger enc ffn wo (1024->128)", 32, 80, 1024, 128),
    ("tiger dec q (128->384)", 32, 5, 128, 384),
    ("tiger lm_head-like (128->1024)", 32, 5, 128, 1024),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| layer | B | T | d_in x d_out | t*t rule | t*(in+out) rule | explicit ms | ghost ms |")
    print("|---|---|---|---|---|---|---|---|")
    for what, b, t, d_in, d_out in SHAPES:
        x, g = torch.randn(b, t, d_in), torch.randn(b, t, d_out)
        te, tg = timed(explicit, x, g, args.repeats), timed(ghost, x, g, args.repeats)
        square = "explicit" if d_in * d_out <= t * t else "ghost"
        linear = "explicit" if d_in * d_out <= t * (d_in + d_out) else "ghost"
        print(
            f"| {what} | {b} | {t} | {d_in}x{d_out} | {square} | {linear} | "
            f"{te * 1e3:.3f} | {tg * 1e3:.3f} |"
        )


if __name__ == "__main__":
    main()
