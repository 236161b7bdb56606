"""A minimal training loop for compress tests: sklearn's digits and the hook order of compress/base.py."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from compress.base import Technique


@dataclass
class Digits:
    """sklearn's 8x8 digits, normalised, with a fixed 1437 / 360 train / test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split() -> Digits:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return Digits(x[train], y[train], x[test], y[test])


def steps_per_epoch(data: Digits, batch_size: int) -> int:
    return -(-len(data.train_x) // batch_size)


def train(model: nn.Module, data: Digits, *, epochs: int, techniques: Sequence[Technique] = (), lr: float = 0.1,
          batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0) -> None:
    """Train ``model`` with SGD (momentum, weight decay, cosine lr), calling the techniques' hooks.

    Runs on one thread: digits-sized tensors gain nothing from more, and on a shared 2-core machine a
    2-thread pool waiting at its barriers is many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(model, data, epochs=epochs, techniques=techniques, lr=lr, batch_size=batch_size,
               weight_decay=weight_decay, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, data: Digits, *, epochs: int, techniques: Sequence[Technique], lr: float,
           batch_size: int, weight_decay: float, seed: int) -> None:
    torch.manual_seed(seed)
    per_epoch = steps_per_epoch(data, batch_size)
    for technique in techniques:
        technique.configure(steps_per_epoch=per_epoch)
        technique.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)
    step = 0
    for epoch in range(epochs):
        model.train()
        for technique in techniques:
            technique.on_epoch_start(model, epoch)
        order = torch.randperm(len(data.train_x))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs, targets = data.train_x[batch], data.train_y[batch]
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
            for technique in techniques:
                loss = technique.loss(loss, outputs, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for technique in techniques:
                technique.on_step_end(model, step)
            step += 1
    for technique in techniques:
        technique.on_stage_end(model)


def correct(model: nn.Module, data: Digits) -> int:
    """Correct test predictions (of 360)."""
    model.eval()
    with torch.no_grad():
        return int((model(data.test_x).argmax(1) == data.test_y).sum())
