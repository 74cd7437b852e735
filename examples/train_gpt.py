"""A plain PyTorch training script. Only the lines marked `anychip` are not plain PyTorch:
they choose the backend and build the step. Run it anywhere:

    python examples/train_gpt.py                    # auto-detect (cuda > tpu > neuron > cpu)
    ANYCHIP_BACKEND=jax:cpu python examples/train_gpt.py
    python examples/train_gpt.py --backend cuda --preset small --precision bf16 --steps 200
    torchrun --nproc-per-node 2 examples/train_gpt.py --backend cpu --parallel ddp   # or fsdp

Under torchrun every rank draws the same global batch (same seed) and TrainStep trains each
rank on its slice of it, so the printed losses are those of the single-process run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import anychip as ac  # anychip
from anychip.workloads import gpt


def loss_fn(model, batch):
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default=None)
    parser.add_argument("--preset", default="tiny", choices=sorted(gpt.PRESETS))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--parallel", default=None, choices=["ddp", "fsdp"], help="under torchrun")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = gpt.GPT(gpt.PRESETS[args.preset])
    vocab = gpt.PRESETS[args.preset].vocab

    backend = ac.backend(args.backend)  # anychip
    step = ac.TrainStep(  # anychip
        model,
        loss_fn,
        optimizer=ac.AdamW(lr=1e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=10, total=args.steps)),
        backend=backend,
        precision=args.precision,
        max_grad_norm=1.0,
        parallel=args.parallel,  # anychip: the global batch is split over the ranks
    )

    for i in range(args.steps):
        # Synthetic data: a repeating pattern the model can learn.
        start = torch.randint(0, vocab, (args.batch, 1))
        tokens = (start + torch.arange(args.seq + 1)) % vocab
        out = step((tokens[:, :-1], tokens[:, 1:]))
        if (i % 20 == 0 or i == args.steps - 1) and ac.is_main_process():  # anychip
            print(f"step {out.step:4d}  loss {out.loss:.4f}  lr {out.lr:.2e}  on {backend.name}")


if __name__ == "__main__":
    main()
