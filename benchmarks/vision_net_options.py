"""Which vision net for the CPU reference scale: prunable channels against CPU cost, in one run.

    python benchmarks/vision_net_options.py [--threads 1] [--batch-size 64] [--steps 10]

For each candidate (WRN-16-1/2/4, CIFAR ResNet-18, PreAct-ResNet-18) on 1x28x28 inputs (Fashion-MNIST's
shape) it prints: parameters, BatchNorm channels (the units RNP masks and prunes), training images/s (SGD
step, forward + backward, after two warm-up steps) and inference images/s at ``--threads`` torch threads,
and the implied minutes per epoch on 10,000 images. Random inputs: the cost does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from torch import nn

    from backdoorbench.models.cifar_nets import WideResNet, cifar_resnet18, preact_resnet18

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    nets = {
        "wrn16_1": lambda: WideResNet(16, 1, 10, 1),
        "wrn16_2": lambda: WideResNet(16, 2, 10, 1),
        "wrn16_4": lambda: WideResNet(16, 4, 10, 1),
        "resnet18": lambda: cifar_resnet18(10, 1),
        "preact_resnet18": lambda: preact_resnet18(10, 1),
    }
    x = torch.randn(a.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (a.batch_size,))
    print(f"threads {a.threads}, batch {a.batch_size}, 1x28x28")
    print("| net | params (M) | BN channels | train img/s | infer img/s | train min / epoch of 10k |")
    print("|---|---|---|---|---|---|")
    for name, make in nets.items():
        torch.manual_seed(0)
        net = make()
        params = sum(p.numel() for p in net.parameters()) / 1e6
        bn = sum(m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        net.train()
        for i in range(a.steps + 2):
            if i == 2:
                t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        train = a.steps * a.batch_size / (time.perf_counter() - t0)
        net.eval()
        with torch.no_grad():
            net(x)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                net(x)
        infer = a.steps * a.batch_size / (time.perf_counter() - t0)
        print(f"| {name} | {params:.2f} | {bn} | {train:.0f} | {infer:.0f} | {10000 / train / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
