# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Time SACB-Net's conv layer shapes in the default (NCDHW) and the channels-last layout on this machine, forward and
backward, side by side in one run. Why the network uses ``scripts.networks.conv.ChannelsLastConv3d``.

    python bench/conv_layout.py [--repeats 3]
"""

from __future__ import annotations

import time

import fire
import torch

# (in channels, out channels, spatial size): SACB-Net layers on an 80x96x112 (half-resolution brain) input.
LAYERS = [
    (1, 4, (80, 96, 112)),
    (4, 8, (80, 96, 112)),
    (8, 8, (80, 96, 112)),
    (16, 8, (80, 96, 112)),
    (8, 3, (80, 96, 112)),
    (16, 16, (40, 48, 56)),
    (32, 32, (20, 24, 28)),
]


def time_layer(cin: int, cout: int, shape, channels_last: bool, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` (forward, backward) seconds of a 3x3x3 convolution on a (1, cin, *shape) input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, *shape, generator=generator)
    w = torch.randn(cout, cin, 3, 3, 3, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    w.requires_grad_()
    best = (float("inf"), float("inf"))
    for _ in range(repeats + 1):  # the first run is warm-up
        start = time.perf_counter()
        y = torch.nn.functional.conv3d(x, w, padding=1)
        middle = time.perf_counter()
        y.sum().backward()
        end = time.perf_counter()
        best = min(best, (middle - start, end - middle), key=sum)
    return best


def main(repeats: int = 3) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer':>28} | {'NCDHW fwd':>9} {'bwd':>7} | {'CL fwd':>7} {'bwd':>7} | bwd ratio")
    for cin, cout, shape in LAYERS:
        f0, b0 = time_layer(cin, cout, shape, False, repeats)
        f1, b1 = time_layer(cin, cout, shape, True, repeats)
        name = f"{cin}->{cout} @ {'x'.join(map(str, shape))}"
        print(f"{name:>28} | {f0:9.3f} {b0:7.3f} | {f1:7.3f} {b1:7.3f} | {b0 / b1:6.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
