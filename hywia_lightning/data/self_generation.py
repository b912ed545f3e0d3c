"""Self-generated calibration text: token windows sampled from the dense model itself.

A calibration source that needs no network and no data file (``source: generated`` of
:class:`~hywia_lightning.data.calibration.CalibrationData`). Every window is one sample of ``seq_len``
tokens drawn from the model before any stage changes it, starting from its beginning-of-sequence
token; the windows are the sampled tokens (the start token is not part of a window, just as a
window cut from a text file starts in the middle of it).

Why these choices (:class:`Generation`'s defaults):

- Sampling from the model's own distribution is the idea of data-free calibration in
  quantization and pruning: LLM-QAT (Liu et al., 2023, arXiv 2305.17888) trains on text the model
  generates from a random first token; "Self-calibration for Language Model Quantization and
  Pruning" (Williams, Chrysostomou and Aletras, NAACL 2025, arXiv 2410.17170) calibrates on text the
  model generates with no external data and finds it competitive with real web text; "Beware of
  Calibration Data for Pruning Large Language Models" (Ji et al., ICLR 2025, arXiv 2410.17711)
  finds that calibration text close to the pre-training data matters more than its quality, and
  self-generates it (from prefixes of real text, with a perplexity filter, which an offline default
  cannot have). Samples of the model are, by construction, the distribution it learned: general
  text rather than one narrow corpus.
- Temperature 1 with nucleus (top-p 0.95) sampling (Holtzman et al., 2020, "The curious case of
  neural text degeneration"): greedy or low-temperature decoding of a small model falls into
  repetition, which gives the refit and the importance statistics a few repeated activation
  patterns; pure sampling at temperature 1 sometimes draws from the unreliable tail of the
  vocabulary and derails a sample. The nucleus keeps the model's distribution and cuts the tail.
  It is searched among the ``top_k`` most likely tokens (a partial sort: a full sort of the bundled
  model's 49k vocabulary took 40% of a decoding step's time on a CPU), so it never holds more than
  256 tokens. Measured on the bundled model (docs/benchmark/calibration.md): temperature 0.7
  calibrated worse than 1; the number of windows mattered far more than the settings.
- Starting from the beginning-of-sequence token lets the model pick the topic, so the samples cover
  what it knows rather than what a prompt suggests; every window is an independent sample.
- Special tokens (end of text, chat markers) are never sampled: a real calibration window is plain
  text, and a sample that ends early would waste its window.

``conversation: true`` samples conversations instead, for a chat model: each sample starts from
its chat template's preamble and first user header (the system prompt the template adds by
default), the model writes the user's request, and whenever it ends a turn with the template's
end-of-turn token the next role's header is written for it (assistant, then user again), until
the window is full. This is Magpie ("Alignment Data Synthesis from Scratch by Prompting Aligned LLMs
with Nothing", Xu et al., ICLR 2025, arXiv 2406.08464): an aligned model prompted with only the
pre-query template writes requests like those it was tuned on, and then its own answers. Why:
free samples of a chat model start from its BOS outside any chat turn, and the bundled model's
begin mid-sentence and wander; in its template it writes requests and answers across many topics,
the text an instruction-tuned model is used on. The preamble and first header are the start (not
in the window); the end-of-turn token is the one special token sampled, the headers are written in.

The sampling uses its own ``torch.Generator`` seeded by ``seed``: the same model, settings and
seed give the same windows (on the same torch build and thread count), and the global random state
is untouched. :mod:`hywia_lightning.data.generation_cache` keeps the windows on disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
from torch import Tensor

log = logging.getLogger(__name__)

GENERATED = "generated"  # the calibration source name
# (0, 1]: the CLI refuses a nucleus outside it while parsing, naming the key
NucleusMass = restricted_number_type("NucleusMass", float, [(">", 0), ("<=", 1)])


@dataclass(frozen=True)
class Generation:
    """How ``source: generated`` samples its windows.

    Args:
        temperature: softmax temperature of the sampling, > 0 (1: the model's own distribution).
        top_p: nucleus: sample among the most likely tokens whose probabilities sum to ``top_p``, in (0, 1].
        top_k: the nucleus is searched among this many most likely tokens.
        batch_size: samples generated side by side (on a CPU a step of 128 costs about twice one of 32:
            1,616 windows of 128 tokens took 795 s at 128 on 2 cores, 384 took 826 s at 32 beside another job).
        conversation: sample conversations in the model's chat template (requests and answers the
            model writes itself, Magpie) instead of free text from its BOS; needs a chat template.
    """

    temperature: PositiveFloat = 1.0
    top_p: NucleusMass = 0.95
    top_k: PositiveInt = 256
    batch_size: PositiveInt = 32
    conversation: bool = False

    def __post_init__(self) -> None:
        self.check("generation")

    def check(self, key: str) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"{key}.temperature={self.temperature!r} must be a number > 0 (1: the model's own distribution)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"{key}.top_p={self.top_p!r} must be in (0, 1] (1: no nucleus cut)")
        for name in ("top_k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}.{name}={value!r} must be a positive integer")
        if not isinstance(self.conversation, bool):
            raise ValueError(f"{key}.conversation={self.conversation!r} must be true or false")

    def describe(self) -> dict:
        return asdict(self)


def start_token(tokenizer) -> int:
    """The token every sample starts from: beginning of sequence, else end of text (GPT-2 style)."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise ValueError("source 'generated' needs a tokenizer with a beginning- or end-of-sequence token to start samples from")


@dataclass(frozen=True)
class ConversationScript:
    """What a conversation sample writes besides what the model samples, read from the chat template:
    the ``start`` (preamble and first user header), and after each turn's ``end_of_turn`` token the
    rest of the marker and the next role's header (``to_assistant`` / ``to_user``)."""

    start: list[int]
    end_of_turn: int
    to_assistant: list[int]
    to_user: list[int]

    @classmethod
    def of(cls, tokenizer) -> "ConversationScript":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("generation.conversation=true samples in the model's chat template, but its tokenizer has "
                             "none; use conversation: false (free text from the BOS)")
        marks = ("\x01", "\x02", "\x03")  # placeholders no template writes
        turns = [{"role": role, "content": mark} for role, mark in zip(("user", "assistant", "user"), marks)]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        first, second, third = (text.index(mark) for mark in marks)

        def ids(piece: str) -> list[int]:
            return tokenizer(piece, add_special_tokens=False)["input_ids"]

        start, to_assistant, to_user = ids(text[:first]), ids(text[first + 1 : second]), ids(text[second + 1 : third])
        if not (to_assistant and to_user and to_assistant[0] == to_user[0]
                and to_assistant[0] in tokenizer.all_special_ids):
            raise ValueError("generation.conversation=true needs a chat template whose turns end with one special token "
                             f"(the model's tokenizer writes {text[first + 1 : second]!r} after a request); "
                             "use conversation: false")
        return cls(start, to_assistant[0], to_assistant[1:], to_user[1:])

    def steer(self, tokens: Tensor, pending: list[list[int]], answering: list[bool]) -> Tensor:
        """The batch's next tokens (``[size, 1]``): a sample with header tokens ``pending`` writes the
        next of them instead of its sampled token; one that sampled the end of a turn gets the next
        role's header pending."""
        tokens = tokens.clone()
        for i, pending_i in enumerate(pending):
            if pending_i:
                tokens[i, 0] = pending_i.pop(0)
            elif tokens[i, 0] == self.end_of_turn:
                pending_i.extend(self.to_user if answering[i] else self.to_assistant)
                answering[i] = not answering[i]
        return tokens


def banned_tokens(tokenizer, vocab_size: int, allowed: int | None = None) -> Tensor:
    """Token ids never sampled: the tokenizer's special tokens (but ``allowed``) and ids beyond its
    vocabulary (embedding matrices are often padded)."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[[i for i in tokenizer.all_special_ids if i < vocab_size and i != allowed]] = True
    banned[len(tokenizer):] = True
    return banned


@torch.no_grad()
def sample_windows(model, tokenizer, num_windows: int, seq_len: int, seed: int, settings: Generation) -> Tensor:
    """``[num_windows, seq_len]`` token ids sampled from ``model`` (see the module's docstring)."""
    script = ConversationScript.of(tokenizer) if settings.conversation else None  # refused before any sampling
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    batches = []
    try:
        for first in range(0, num_windows, settings.batch_size):
            size = min(settings.batch_size, num_windows - first)
            batches.append(_sample_batch(model, tokenizer, size, seq_len, generator, settings, script, device))
            log.info("generated calibration: %d/%d windows of %d tokens (%.0f s)", first + size, num_windows, seq_len,
                     time.perf_counter() - start)
    finally:
        model.train(was_training)
    return torch.cat(batches)


def _sample_batch(model, tokenizer, size: int, seq_len: int, generator: torch.Generator, settings: Generation,
                  script: ConversationScript | None, device: torch.device) -> Tensor:
    start = script.start if script else [start_token(tokenizer)]
    tokens = torch.tensor([start] * size, dtype=torch.long, device=device)
    out = model(input_ids=tokens, use_cache=True)
    banned = banned_tokens(tokenizer, out.logits.shape[-1], script.end_of_turn if script else None).to(device)
    pending, answering = [[] for _ in range(size)], [False] * size  # a conversation's headers to write, its role
    sampled = []
    for _ in range(seq_len):
        logits = out.logits[:, -1].float().masked_fill(banned, float("-inf")) / settings.temperature
        top, ids = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1)
        probs = top.softmax(-1)
        outside = probs.cumsum(-1) - probs >= settings.top_p  # tokens after the nucleus is full (the first always stays)
        probs = probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        tokens = ids.gather(-1, choice)
        if script:
            tokens = script.steer(tokens, pending, answering)
        sampled.append(tokens)
        if len(sampled) < seq_len:
            out = model(input_ids=tokens, cache=out.cache, use_cache=True)
    return torch.cat(sampled, dim=1).cpu()
