"""A model's decoder layers run one at a time over cached hidden states of the windows.

Why: a statistic taken per layer (reconstruction's ``X Xᵀ`` of ``o_proj``'s and ``down_proj``'s
inputs, a GiB each for a 7B model's ``down_proj``) need then exist for one layer only: run layer
``i`` over every window, take what it needs, drop it, run layer ``i + 1``. What is cached instead is
each window's hidden state at the current layer (``seq_len × hidden`` a window) and the keyword
arguments the model hands each decoder layer (rotary embeddings, masks), captured from one probe
forward pass: they depend on the window length only, and all windows have one length. The
layers' outputs are those of the whole model's forward pass (the same modules on the same inputs).
Independent reconstruction streams the dense model; sequential reconstruction streams the pruned
one, so each layer sees what the already refit layers before it produce, at about three forward
passes of the pruned range in all instead of one forward pass per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .structures import decoder_layers


class StopForward(Exception):
    """Raised by a hook once what was needed of a forward pass is captured: the rest is not run."""


def stop_forward(module: nn.Module, args, output) -> None:
    """A forward hook that ends the forward pass after its module."""
    raise StopForward


def run_windows(model: nn.Module, windows: Tensor) -> None:
    """One forward pass per window, each as far as the hooks let it go (:class:`StopForward`)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for window in windows:
            try:
                model(input_ids=window.reshape(1, -1).to(device), use_cache=False)
            except StopForward:
                pass


class LayerStream:
    """Decoder layers ``first..last`` of ``model`` (frozen) over ``windows``, one at a time."""

    def __init__(self, model: nn.Module, windows: Tensor, first: int, last: int) -> None:
        layers = decoder_layers(model)
        self.layers = {i: layers[i] for i in range(first, last + 1)}
        self.next = first
        self.arguments: dict[int, tuple[tuple, dict]] = {}  # each layer's arguments besides the hidden states
        self.hidden: list[Tensor] = []

        def capture(index: int):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                self.arguments.setdefault(index, (tuple(args[1:]), kwargs))
                if index == first:
                    self.hidden.append(hidden)
                    if last in self.arguments:
                        raise StopForward  # the probe has run: later windows need only the first input
            return hook

        handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in self.layers.items()]
        handles.append(self.layers[last].register_forward_hook(stop_forward))
        try:
            run_windows(model, windows)
        finally:
            for handle in handles:
                handle.remove()

    def _layer_outputs(self):
        """Each window's output of the next layer, one window at a time."""
        layer, (args, kwargs) = self.layers[self.next], self.arguments.get(self.next, ((), {}))
        with torch.no_grad():
            for hidden in self.hidden:
                output = layer(hidden, *args, **kwargs)
                yield output[0] if isinstance(output, tuple) else output

    def run(self) -> None:
        """Run the next layer over every window without moving on: for its hooks (outputs dropped)."""
        for _ in self._layer_outputs():
            pass

    def advance(self) -> int:
        """Run the next layer over every window (its hooks fire) and move on; returns that layer's index."""
        index = self.next
        for w, output in enumerate(self._layer_outputs()):
            self.hidden[w] = output  # in place: one window's output at a time beside the cache
        self.next += 1
        return index
