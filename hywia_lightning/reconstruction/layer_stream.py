"""A model's decoder layers run one at a time over cached hidden states of the windows.

Why: a statistic taken per layer (reconstruction's ``X Xᵀ`` of ``o_proj``'s and ``down_proj``'s
inputs, a GiB each for a 7B model's ``down_proj``) need then exist for one layer only: run layer
``i`` over every window, take what it needs, drop it, run layer ``i + 1``. What is cached instead is
each window's hidden state at the current layer (``seq_len × hidden`` a window) and the keyword
arguments the model hands each decoder layer (rotary embeddings, masks), captured from one probe
forward pass: they depend on the batch's shape only (every window has one length, so at most two
probes: full batches and the remainder). Windows go through a layer ``batch_size`` at a time: a
small model's layer on one 128-token window is too small a matrix product to keep a core busy. The
layers' outputs are those of the whole model's forward pass (the same modules on the same inputs).
Independent reconstruction streams the dense model; sequential reconstruction streams the pruned
one, so each layer sees what the already refit layers before it produce, at about three forward
passes of the pruned range in all instead of one forward pass per layer.

Where FSDP2 shards the weights, every call of a layer is a collective: every rank must make the
same calls with the same batch sizes. ``pad_to`` appends copies of the first window up to that
many windows (every rank the same count). :attr:`LayerStream.batch_ids` are the ids of the windows
of the batch being run (``ids``, default 0, 1, ...; −1 for padding), so that a statistic leaves the
padding out (:attr:`LayerStream.valid`: how many leading windows are real) and can split the
windows into folds the same way on any number of ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.structures import decoder_layers
from ..distributed.sharded_model import has_sharded_weights, reshard


class StopForward(Exception):
    """Raised by a hook once what was needed of a forward pass is captured: the rest is not run."""


def stop_forward(module: nn.Module, args, output) -> None:
    """A forward hook that ends the forward pass after its module."""
    raise StopForward


def run_windows(model: nn.Module, windows: Tensor, batch_size: int = 1) -> None:
    """One forward pass per batch of windows, each as far as the hooks let it go (:class:`StopForward`)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in windows.reshape(-1, windows.shape[-1]).split(batch_size):
            if not len(batch):
                continue  # no windows at all (a rank's empty share): nothing to run
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass


class LayerStream:
    """Decoder layers ``first..last`` of ``model`` (frozen) over ``windows``, one at a time,
    ``batch_size`` windows per call of a layer."""

    def __init__(self, model: nn.Module, windows: Tensor, first: int, last: int, batch_size: int = 1,
                 pad_to: int | None = None, ids: Tensor | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (windows per call of a layer)")
        windows = windows.reshape(-1, windows.shape[-1])
        self.batch_size = batch_size
        self.ids = torch.arange(len(windows)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if len(self.ids) != len(windows):
            raise ValueError(f"ids has {len(self.ids)} entries for {len(windows)} windows")
        if pad_to is not None and pad_to > len(windows):
            windows = torch.cat([windows, windows[:1].expand(pad_to - len(windows), -1)])
            self.ids = torch.cat([self.ids, self.ids.new_full((pad_to - len(self.ids),), -1)])
        self.batch_ids = self.ids[:batch_size]
        layers = decoder_layers(model)
        self.layers = {i: layers[i] for i in range(first, last + 1)}
        self.next = first
        # each layer's arguments besides the hidden states, per batch size
        self.arguments: dict[tuple[int, int], tuple[tuple, dict]] = {}
        self.hidden: list[Tensor] = []  # one batch of windows' hidden states each

        def capture(index: int):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                self.arguments.setdefault((index, len(hidden)), (tuple(args[1:]), kwargs))
                if index == first:
                    self.hidden.append(hidden)
                    if (last, len(hidden)) in self.arguments:
                        raise StopForward  # this batch size was probed: later batches need only the first input
            return hook

        handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in self.layers.items()]
        handles.append(self.layers[last].register_forward_hook(stop_forward))
        try:
            run_windows(model, windows, batch_size)
        finally:
            for handle in handles:
                handle.remove()
        if has_sharded_weights(model):
            reshard(model)  # the forward passes stopped inside FSDP2 units, which stay gathered otherwise

    def _layer_outputs(self):
        """Each batch's output of the next layer, one batch at a time."""
        layer = self.layers[self.next]
        with torch.no_grad():
            for b, hidden in enumerate(self.hidden):
                self.batch_ids = self.ids[b * self.batch_size : b * self.batch_size + len(hidden)]
                args, kwargs = self.arguments.get((self.next, len(hidden)), ((), {}))
                output = layer(hidden, *args, **kwargs)
                yield output[0] if isinstance(output, tuple) else output

    def restart(self, index: int, hidden: list[Tensor]) -> None:
        """Run again from layer ``index``, whose inputs are ``hidden`` (one tensor per batch, as cached)."""
        self.next, self.hidden = index, [h.clone() for h in hidden]

    @property
    def valid(self) -> int:
        """How many leading windows of the batch being run are real (the rest is padding)."""
        return int((self.batch_ids >= 0).sum())

    def run(self) -> None:
        """Run the next layer over every window without moving on: for its hooks (outputs dropped)."""
        for _ in self._layer_outputs():
            pass

    def advance(self) -> int:
        """Run the next layer over every window (its hooks fire) and move on; returns that layer's index."""
        index = self.next
        for b, output in enumerate(self._layer_outputs()):
            self.hidden[b] = output  # in place: one batch's output at a time beside the cache
        self.next += 1
        return index
