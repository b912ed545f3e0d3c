"""The calibration windows' hidden states, carried through the decoder one layer at a time.

Layer-wise reconstruction needs every layer's inputs as the (already pruned) model produces them.
Running the model from its embeddings for each layer costs a forward pass per layer, quadratic in
depth; this keeps the hidden states entering the current layer for every window (``windows × seq
× hidden`` in the model's dtype, on its device) and advances them through one layer when that
layer is done. Each layer runs through its own ``forward``, with the arguments the model gave it
(position embeddings, mask), so any family's decoder layer works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .structures import decoder_layers


class _Captured(Exception):
    """Raised by the capture hook: the layers after the captured one are not needed."""


class LayerStream:
    """Hidden states entering decoder layer ``layer`` for each batch of calibration windows."""

    def __init__(self, model: nn.Module, windows: Tensor, layer: int, batch_size: int = 8) -> None:
        self.model, self.layer = model, layer
        self.batches: list[tuple[Tensor, dict]] = []
        device = next(model.parameters()).device

        def capture(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            self.batches.append((hidden, kwargs))
            raise _Captured

        handle = decoder_layers(model)[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in windows.split(batch_size):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()

    def run(self) -> list[Tensor]:
        """The current layer's outputs for every batch; forward hooks on it see every window."""
        layer = decoder_layers(self.model)[self.layer]
        with torch.no_grad():
            outputs = [layer(hidden, **kwargs) for hidden, kwargs in self.batches]
        return [out[0] if isinstance(out, tuple) else out for out in outputs]

    def advance(self) -> None:
        """Move on to the next layer: its inputs are the current layer's outputs."""
        outputs = self.run()
        self.batches = [(out, kwargs) for out, (_, kwargs) in zip(outputs, self.batches)]
        self.layer += 1
