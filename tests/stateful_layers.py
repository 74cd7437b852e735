"""Models whose training step is more than a function of the weights and the batch: dropout
(a random stream) and BatchNorm (running statistics). The cases tests/test_rng_state.py,
tests/test_batchnorm.py and their tests/xla twins run, on whichever backend they are given,
against the plain PyTorch loop or an uninterrupted run of the same backend.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import anychip as ac
from anychip import checkpoint


# -- dropout ---------------------------------------------------------------------------------------
def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def mlp_batches(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def gpt2_batches(n: int) -> list:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 97, (2, 16), generator=g) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Case:
    build: object
    loss_fn: object
    batches: object


DROPOUT = {"nn.Dropout": Case(dropout_mlp, mlp_loss, mlp_batches), "gpt2": Case(gpt2, gpt2_loss, gpt2_batches)}
OPTIMIZER = ac.SGD(lr=0.05, momentum=0.9)


def fresh_step(case: Case, backend: str, seed: int) -> ac.TrainStep:
    """The same initial weights every time; ``seed`` is torch's seed when the step is built."""
    torch.manual_seed(0)
    model = case.build()
    torch.manual_seed(seed)
    return ac.TrainStep(model, case.loss_fn, OPTIMIZER, backend=backend)


def weights(step) -> dict:
    return {k: v.detach().cpu().clone() for k, v in step.model.state_dict().items()}


def run(case: Case, backend: str, seed: int, steps: int = 8):
    """(losses, final weights) of ``steps`` updates from a fresh step."""
    step = fresh_step(case, backend, seed)
    losses = [float(step(b).loss) for b in case.batches(steps)]
    return losses, weights(step)


def saved_midway(case: Case, backend: str, seed: int, directory):
    """Eight updates with an ``ac.save`` after the fourth: (losses, final weights) of this
    uninterrupted run, the checkpoint in ``directory``."""
    step = fresh_step(case, backend, seed)
    losses = []
    for i, b in enumerate(case.batches(8)):
        if i == 4:
            checkpoint.save(step, directory)
        losses.append(float(step(b).loss))
    return losses, weights(step)


def resumed(case: Case, backend: str, seed: int, directory, *, restore_rng: bool = True):
    """A fresh step built under ``seed``, ``ac.load`` of the update-4 checkpoint in ``directory``,
    updates 5..8: (losses, final weights)."""
    step = fresh_step(case, backend, seed)
    checkpoint.load(directory, step, restore_rng=restore_rng)
    losses = [float(step(b).loss) for b in case.batches(8)[4:]]
    return losses, weights(step)


def plain_dropout_run(case: Case, seed: int, steps: int = 8) -> list[float]:
    """The loop a user writes, on torch's CPU generator: what the ``cpu`` backend must draw."""
    torch.manual_seed(0)
    model = case.build()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=OPTIMIZER.lr, momentum=OPTIMIZER.momentum)
    losses = []
    for b in case.batches(steps):
        loss = case.loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- BatchNorm -------------------------------------------------------------------------------------
BN_STEPS = 5


def conv_bn(momentum) -> nn.Module:
    """Two BatchNorm2d layers (one affine-free) around convolutions: statistics over N, H, W."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=momentum, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )


def bn_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def bn_batches(n: int = BN_STEPS) -> list:
    # Shifted and scaled so that the statistics move far from their initial 0 and 1.
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def plain_bn_run(momentum) -> nn.Module:
    model = conv_bn(momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in bn_batches():
        bn_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def bn_step(momentum, backend: str) -> ac.TrainStep:
    return ac.TrainStep(conv_bn(momentum), bn_loss, ac.SGD(lr=0.1), backend=backend)


def statistics(model) -> dict:
    """Every running statistic of the model's BatchNorm layers, as CPU float64."""
    return {k: v.detach().cpu().double() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def statistics_error(got: dict, want: dict) -> float:
    """The largest relative difference of the running statistics (absolute below 1)."""
    assert got.keys() == want.keys()
    return max(float(((got[k] - want[k]).abs() / want[k].abs().clamp_min(1.0)).max()) for k in want)
