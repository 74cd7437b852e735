"""Run by tests/xla/test_xla_ddp.py under torchrun: a few ``parallel="ddp"`` steps on
``neuron-xla``; prints the losses as JSON on rank 0."""

import json

import anychip as ac
from anychip import workloads

w = workloads.get("mlp")
step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="neuron-xla", parallel="ddp", max_grad_norm=1.0)
losses = [step(w.batch(i, 8, 1, 0)).loss for i in range(3)]
if ac.is_main_process():
    print(json.dumps(losses))
