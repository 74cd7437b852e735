"""The user-optimizer cases shared by tests/test_user_optimizer.py (cpu, jax:cpu) and
tests/xla/test_xla_user_optimizer.py (neuron-xla): a small model, its data, the optimizer and
scheduler recipes a plain torch script would build, and that script's own loop."""

from __future__ import annotations

import torch

STEPS = 8


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def build() -> Net:
    torch.manual_seed(0)
    return Net()


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def batches(n: int = STEPS, start: int = 0) -> list:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(start + n)]
    return data[start:]


def no_decay(name: str, p) -> bool:
    return p.ndim < 2  # biases and norm weights: the usual LLM recipe


def adamw_warmup(model):
    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    exempt = [p for n, p in model.named_parameters() if no_decay(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": exempt, "weight_decay": 0.0}], lr=2e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


def sgd_onecycle(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    # cycle_momentum (the default) moves the momentum every step, opposite to the lr
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=STEPS + 2)


def cosine_sequential(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])


RECIPES = {"adamw-groups-lambdalr": adamw_warmup, "sgd-nesterov-onecycle": sgd_onecycle, "adam-sequential": cosine_sequential}


def plain_loop(recipe, data):
    """What the user's script does without anychip."""
    model = build()
    opt, sched = recipe(model)
    losses, lrs, momenta = [], [], []
    for batch in data:
        lrs.append(tuple(g["lr"] for g in opt.param_groups))
        momenta.append(opt.param_groups[0].get("momentum"))
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, lrs, momenta, model
