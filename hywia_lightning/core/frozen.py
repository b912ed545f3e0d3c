"""A model held frozen and in eval mode for a while, then given back as it was.

Estimation (the weights' gradients are formed by hooks, never by autograd) and the learned fusion
(only the fusion attention trains) both run the model this way; dropout is off, so what they
measure is the deployed model.
"""

from __future__ import annotations

from torch import nn


class Frozen:
    """Freezes every weight of ``model`` and puts it in eval mode; :meth:`restore` gives back each
    weight's ``requires_grad`` and the model's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.trainable = {p: p.requires_grad for p in model.parameters()}
        self.was_training = model.training
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def restore(self) -> None:
        for p, flag in self.trainable.items():
            p.requires_grad_(flag)
        self.model.train(self.was_training)
