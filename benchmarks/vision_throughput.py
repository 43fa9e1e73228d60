"""Victim training throughput: the Lightning module against a plain PyTorch loop, in one run.

    python benchmarks/vision_throughput.py [--model wrn16_1] [--data mnist5k] [--n 2000] [--epochs 2]

Both train the same freshly initialised model (same seed) on the same images with the same loader,
augmentation (``model.augment``), optimiser (SGD, momentum, weight decay from ``configs/trainer/vision.yaml``
unless overridden) and linear learning-rate decay, for the same number of epochs. The Lightning time is
the whole ``Trainer.fit`` call (set-up included); the loop time is the whole loop. Prints images/s for
both and the ratio (target ≥ 0.95). The two runs alternate ``--repeats`` times; the best of each is kept.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    import backdoorbench  # noqa: F401  (torchvision guard first)
    from backdoorbench.cli import config_dir
    from backdoorbench.config import to_dataclass
    from backdoorbench.modality.base import to_device
    from backdoorbench.modality.vision import image_spec
    from backdoorbench.registry import REGISTRY
    from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, make_loader, make_trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wrn16_1")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--n", type=int, default=2000, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    REGISTRY.load()
    cdir = config_dir()
    cfg = to_dataclass(TrainConfig, OmegaConf.load(cdir / "trainer" / "vision.yaml"), "trainer")
    cfg.max_epochs = a.epochs
    cfg.accelerator = "cpu" if not torch.cuda.is_available() else "gpu"
    if a.batch_size:
        cfg.batch_size = a.batch_size
    bundle = REGISTRY.get("dataset", a.data).obj()
    samples = bundle.train.subset(np.arange(min(a.n, len(bundle.train))))
    spec = image_spec(bundle)
    model_entry = REGISTRY.get("model", a.model)
    model_cfg = model_entry.config(name=a.model) if model_entry.config else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def new_model():
        torch.manual_seed(0)
        return model_entry.obj(model_cfg, bundle.num_classes, image=spec)

    def lightning_run() -> float:
        model = new_model()
        loader = make_loader(model, samples, cfg.batch_size, shuffle=True, seed=0)
        module = ClassifierModule(model, cfg)
        trainer = make_trainer(cfg)
        model.train()
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        return time.perf_counter() - t0

    def plain_run() -> float:
        from transformers import get_linear_schedule_with_warmup

        model = new_model().to(device)
        loader = make_loader(model, samples, cfg.batch_size, shuffle=True, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        total = len(loader) * cfg.max_epochs
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
        model.train()
        t0 = time.perf_counter()
        for _ in range(cfg.max_epochs):
            for batch in loader:
                inputs = model.augment(to_device(batch["inputs"], device))
                loss = F.cross_entropy(model(inputs), batch["labels"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_lit, t_plain = [], []
    for _ in range(a.repeats):
        t_plain.append(plain_run())
        t_lit.append(lightning_run())
    images = len(samples) * cfg.max_epochs
    lit, plain = images / min(t_lit), images / min(t_plain)
    print(f"{a.model} on {a.data}: {len(samples)} images x {cfg.max_epochs} epochs, batch {cfg.batch_size}, {device}")
    print(f"torch threads {torch.get_num_threads()}; times lightning {t_lit} s, plain {t_plain} s")
    print(f"plain PyTorch loop : {plain:8.1f} images/s")
    print(f"Lightning module   : {lit:8.1f} images/s")
    print(f"ratio              : {lit / plain:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
