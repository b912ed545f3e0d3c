"""The memory plan: each stage's peak memory per rank, by arithmetic from a model's shape and a job's settings.

Why: a 7B–70B job that does not fit learns it after minutes of loading (or a download), and the
remedy (``accumulate_dtype``, ``devices``, ``estimation_batch_size``, ``dtype``) depends on which
stage is the peak. Each stage's peak is a sum of named parts, every one the bytes of tensors this
code holds at that stage's highest point (the sources are named in each part's comment), plus the
runtime (the process and its libraries on a CPU, the CUDA context on a GPU).

Per rank: estimation, scoring, fusion training and reconstruction hold the whole model on every
rank (windows are sharded), unless ``shard_weights`` shards it with FSDP2: then each rank holds
``1/weight_shards`` of the weights, the gathered root (embeddings, head) and one or two gathered
decoder layers, a ``slicing`` stage builds the pruned model one gathered dense layer at a time and
shards each pruned layer again (:func:`hywia_lightning.distributed.gathered_slicing.sharded_pruned`), every later
stage holds ``1/weight_shards`` of the pruned weights, and an ``export`` stage gathers one tensor at
a time onto rank 0's host (:mod:`hywia_lightning.distributed.gathered_copy`; host memory is not planned). With several ranks each keeps only its
``1/estimation_shards`` of the ``g``/``g²`` accumulators (``shard_accumulators``,
:mod:`hywia_lightning.distributed.sharded_sums`), and scoring gathers one layer's statistics at a time. Reconstruction holds one layer's Gram matrices at
a time (:mod:`hywia_lightning.reconstruction.layer_stream`). LoRA recovery under FSDP shards weights, adapters and
optimizer states over ``devices × num_nodes``. Parts divided over the ranks are marked ``sharded``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.shapes import ModelShape

GIB = 2**30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
#: resident size of a job's process besides its tensors: Python with torch, transformers and Lightning
#: imported (0.44 GiB measured), the tokenizer, the calibration text and the trainer (0.55 GiB in a job)
CPU_RUNTIME_BYTES = int(0.55 * GIB)
#: the CUDA context and the caching allocator's slack on a GPU (an assumption, not measured here)
GPU_RUNTIME_BYTES = int(1.0 * GIB)


@dataclass(frozen=True)
class EstimationSettings:
    """What importance estimation and scoring hold: the statistics ``needs`` asks for, over ``layers``."""

    needs: frozenset[str]
    layers: tuple[int, ...]                     # the pruned layers (those with accumulators)
    attention_unit: str = "query_heads"
    accumulate_dtype: str = "float32"
    batch_size: int = 1                          # estimation_batch_size
    num_windows: int = 32
    seq_len: int = 128
    learned_fusion: bool = False                 # HyWIA mode: learned (a fusion training stage)
    fusion_kl: bool = False                      # ... trained against the KL from the unmasked model


@dataclass(frozen=True)
class ReconstructionSettings:
    mode: str = "independent"
    seq_len: int = 128
    num_windows: int = 32                        # over all ranks (each caches its share's hidden states)
    batch_size: int = 1                          # windows per call of a layer
    folds: int = 1                               # a damping chosen by held-out windows: one set of moments per fold
    kl_windows: int = 0                          # a damping chosen by the KL (choose_by: kl) on this many distillation windows


@dataclass(frozen=True)
class DistillationSettings:
    """The distillation objective's teacher and, with ``search``, the width search against it."""

    windows: int = 32
    top_k: int = 64
    seq_len: int = 128
    batch_size: int = 8
    search: bool = False
    search_windows: int = 8
    search_batch_size: int = 8


@dataclass(frozen=True)
class EvaluationSettings:
    """Perplexity: ``batch_size`` chunks of ``seq_len`` tokens per forward pass."""

    batch_size: int = 8
    seq_len: int = 128


@dataclass(frozen=True)
class RecoverySettings:
    """LoRA recovery: ``batch_size`` is the global batch (every rank takes its share)."""

    r: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.05
    batch_size: int = 8
    seq_len: int = 256
    activation_checkpointing: bool = False
    fsdp: bool = False
    teacher: bool = False  # the unpruned teacher (distillation, or a named teacher's validation KL)
    kl: bool = False       # the loss has a KL to the teacher (its logits and full distributions per token)
    hidden_layers: int | None = 0  # layers the loss's hidden-state term compares: 0 no term, None every layer


@dataclass(frozen=True)
class JobSettings:
    """The job's keys that decide memory; ``None`` for a stage the job does not run."""

    dtype: str = "float32"                       # model.init_args.dtype (or the trainer's *-true precision)
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "cpu"                     # "cpu" or "gpu": which runtime overhead applies
    target_ratio: float = 0.0                    # what the stages after pruning see removed
    estimation: EstimationSettings | None = None
    reconstruction: ReconstructionSettings | None = None
    distillation: DistillationSettings | None = None
    perplexity: EvaluationSettings | None = None
    recovery: RecoverySettings | None = None
    estimation_shards: int = 1                   # ranks the g/g² accumulators are sharded over (shard_accumulators)
    shard_weights: bool = False                  # pruning.shard_weights: FSDP2 shards the weights before slicing

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def weight_shards(self) -> int:
        """The ranks the weights of estimation, scoring and independent reconstruction are sharded over."""
        return self.world_size if self.shard_weights else 1


@dataclass
class Part:
    name: str
    bytes: int
    sharded: bool = False   # divided over the ranks of a sharded stage (already applied to ``bytes``)


@dataclass
class StagePeak:
    """One stage's peak on one rank, as the sum of its parts."""

    stage: str
    parts: list[Part]
    note: str = ""

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class MemoryPlan:
    shape: ModelShape
    job: JobSettings
    stages: list[StagePeak] = field(default_factory=list)

    @property
    def peak(self) -> StagePeak | None:
        return max(self.stages, key=lambda s: s.bytes, default=None)

    @property
    def peak_gib(self) -> float:
        return self.peak.gib if self.peak else 0.0

    def fits(self, device_bytes: float) -> bool:
        return self.peak is None or self.peak.bytes <= device_bytes

    def to_dict(self) -> dict:
        return {
            "peak_gib": round(self.peak_gib, 3), "peak_stage": self.peak.stage if self.peak else None,
            "world_size": self.job.world_size, "parameters": self.shape.parameters(),
            "stages": {s.stage: {"gib": round(s.gib, 3), **{p.name: round(p.bytes / GIB, 3) for p in s.parts}}
                       for s in self.stages},
        }


# -- the parts ---------------------------------------------------------------------------------------

def _prunable(shape: ModelShape, layer: int, attention_unit: str) -> dict[str, tuple[int, int]]:
    """The Linears estimation accumulates for (``unit_groups.prunable_linears``)."""
    linears = shape.layer_linears(layer)
    return {n: s for n, s in linears.items() if attention_unit != "none" or n in ("gate_proj", "up_proj", "down_proj")}


def _members(shape: ModelShape, layer: int, attention_unit: str) -> dict[str, tuple[int, int]]:
    """The parameters a unit group scores (``unit_groups.attention_members`` / ``mlp_members``)."""
    names = ["gate_proj", "up_proj", "down_proj"]
    if attention_unit != "none":
        names += ["q_proj", "o_proj"] + (["k_proj", "v_proj"] if attention_unit == "kv_groups" else [])
    linears = shape.layer_linears(layer)
    return {n: linears[n] for n in names}


def _layer_activations(shape: ModelShape, layer: int, b: int, kept_inputs: int) -> int:
    """Bytes per token autograd keeps for one decoder layer whose weights are frozen: both RMSNorms'
    float32 inputs, SDPA's q, k, v and output, the MLP's gate, SiLU and up outputs, plus
    ``kept_inputs`` features (the inputs hooks or trainable adapters keep) in the model dtype."""
    q, kv, i = shape.heads(layer) * shape.head_dim, shape.kv_heads(layer) * shape.head_dim, shape.intermediate(layer)
    return 2 * 4 * shape.hidden_size + b * (2 * q + 2 * kv + 3 * i + kept_inputs)


def _logits(shape: ModelShape, tokens: int) -> int:
    """The vocabulary-sized tensors of a backward: float32 log-probabilities, their gradient and the
    logits' gradient (12 bytes a token and vocabulary entry)."""
    return 12 * tokens * shape.vocab_size


def _kl_logits(shape: ModelShape, tokens: int, b: int) -> int:
    """A KL to a teacher run beside: the teacher's logits (``b`` bytes); in float32 its log-probabilities,
    probabilities and their product, the student's log-probabilities at the temperature; in the backward
    the gradients of the product, of the log-probabilities and of the logits. Measured:
    docs/performance/memory_plan_recovery.md"""
    return tokens * shape.vocab_size * (b + 7 * 4)


def weights(shape: ModelShape, b: int, kept: float = 1.0) -> int:
    return int(shape.parameters() * kept * b)


def _largest_layer(shape: ModelShape) -> int:
    return max(shape.layer_parameters(i) for i in range(shape.num_hidden_layers))


def dense_weights(shape: ModelShape, job: JobSettings, gathered_layers: int = 1, root: bool = True) -> list[Part]:
    """The dense model as a stage before slicing holds it: whole, or (``shard_weights``) this rank's
    ``1/N`` shard, with ``root`` the root unit gathered whole during a pass (embeddings, final
    norm, head: ``sharded_model.shard_model``) and ``gathered_layers`` decoder layers (a backward's
    prefetch gathers the next layer while one runs)."""
    b, n = DTYPE_BYTES[job.dtype], job.weight_shards
    if n == 1:
        return [Part("weights", weights(shape, b))]
    parts = [Part("weights", -(-weights(shape, b) // n), True)]
    if root:
        outside = shape.parameters() - sum(shape.layer_parameters(i) for i in range(shape.num_hidden_layers))
        parts.append(Part("root gathered (embeddings, head)", outside * b))
    return parts + [Part(f"decoder layers gathered ({gathered_layers})", gathered_layers * _largest_layer(shape) * b)]


def _copies(e: EstimationSettings) -> int:
    """How many weight-sized sums estimation keeps: ``g`` and/or ``g²``."""
    return ("gradients" in e.needs) + ("squared_gradients" in e.needs)


def accumulator_bytes(shape: ModelShape, e: EstimationSettings, shards: int = 1) -> int:
    """``g`` and ``g²`` (each the size of every prunable weight; one rank's ``⌈numel / shards⌉`` of
    each when sharded), per-window saliency rows, input moments and the output projections' ``x xᵀ``
    (whole on every rank), in ``accumulate_dtype`` (``estimation.Estimator``, ``sharded_sums.Sums``)."""
    a = DTYPE_BYTES[e.accumulate_dtype]
    copies = _copies(e)
    total = 0
    for layer in e.layers:
        for name, (out, inp) in _prunable(shape, layer, e.attention_unit).items():
            total += copies * -(-out * inp // shards) * a
            if "window_saliency" in e.needs:
                total += e.num_windows * (out + inp) * a
            if "input_moments" in e.needs:
                total += 2 * inp * a
            if "output_gram" in e.needs and name in OUTPUT_PROJECTIONS:
                total += inp * inp * a
    return total


OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # unit_groups.output_projections


def _widest_output_input(shape: ModelShape, e: EstimationSettings) -> int:
    return max(i for layer in e.layers for n, (_, i) in _prunable(shape, layer, e.attention_unit).items()
               if n in OUTPUT_PROJECTIONS)


def _largest(shape: ModelShape, e: EstimationSettings) -> int:
    return max(o * i for layer in e.layers for o, i in _prunable(shape, layer, e.attention_unit).values())


def estimation_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    e, b, shards = job.estimation, DTYPE_BYTES[job.dtype], job.estimation_shards
    a = DTYPE_BYTES[e.accumulate_dtype]
    backward = bool(e.needs & {"gradients", "squared_gradients", "window_saliency"})
    parts = [*dense_weights(shape, job, 2 if backward else 1),
             Part("accumulators", accumulator_bytes(shape, e, shards), shards > 1)]
    if backward:
        tokens, first = e.batch_size * e.seq_len, min(e.layers)
        hooked = set(e.layers)
        per_token = 0
        for layer in range(first, shape.num_hidden_layers):  # the graph starts at the first prunable Linear
            q = shape.heads(layer) * shape.head_dim
            kept = (2 * shape.hidden_size + q + shape.intermediate(layer)) if layer in hooked else 0
            per_token += _layer_activations(shape, layer, b, kept)
        parts.append(Part("activations", tokens * per_token))
        parts.append(Part("logits", _logits(shape, tokens)))
        # one window's gradient δᵢᵀxᵢ of the largest Linear, its accumulate-dtype copy and the Taylor term
        transient = b + (a if a != b else 0) + (a if "window_saliency" in e.needs else 0)
        parts.append(Part("per-window gradient", _largest(shape, e) * transient))
        if shards > 1:  # sharded: the batch's local g/g² of one Linear until it is reduce-scattered
            parts.append(Part("batch sums of one Linear", _copies(e) * _largest(shape, e) * a))
    else:  # forward passes only: one layer's outputs at a time and the logits (in the model dtype: no loss is taken)
        tokens = e.batch_size * e.seq_len
        parts.append(Part("activations", tokens * b * (3 * shape.intermediate_size + 4 * shape.hidden_size
                                                       + shape.vocab_size)))
    return StagePeak("estimation", parts, _held(job) + (f", g/g² sharded over {shards}" if shards > 1 else ""))


def _held(job: JobSettings) -> str:
    return f"weights sharded over {job.weight_shards}" if job.weight_shards > 1 else "whole model on every rank"


def _unit_major_copies(shape: ModelShape, e: EstimationSettings, b: int) -> int:
    """What building one attention group copies (``unit_groups.build_group``; groups are built one
    at a time, ``unit_groups.UnitGroups``): a unit-major view (``[units, -1]``) of a unit that spans
    several rows (a query head's ``head_dim`` rows) or several columns (``o_proj``'s) cannot be a
    view of the transposed or broadcast tensor. So ``o_proj``'s weight, ``g`` and ``g²`` are copied,
    and with input moments each such member's input norms and variances broadcast to its weight's
    shape, in the model dtype. MLP channels (one row, one column) are views."""
    a = DTYPE_BYTES[e.accumulate_dtype]
    copies = _copies(e)
    largest = 0
    for layer in e.layers:
        total = 0
        units = shape.kv_heads(layer) if e.attention_unit == "kv_groups" else shape.heads(layer)
        for name, (out, inp) in _members(shape, layer, e.attention_unit).items():
            if name in ("gate_proj", "up_proj", "down_proj"):
                continue
            columns = name == "o_proj"
            if (inp if columns else out) // units <= 1:
                continue
            if columns:
                total += out * inp * (b + copies * a)
            if "input_moments" in e.needs:
                total += 2 * out * inp * b
        largest = max(largest, total)
    return largest


def _gathered_layer(shape: ModelShape, e: EstimationSettings) -> int:
    """Sharded: the whole ``g``/``g²`` of one layer's members (its MLP group, and the attention group
    built while the MLP's is still referenced), gathered for scoring (``sharded_sums.whole``)."""
    a = DTYPE_BYTES[e.accumulate_dtype]
    return max(_copies(e) * a * sum(o * i for o, i in _members(shape, layer, e.attention_unit).values())
               for layer in e.layers)


def scoring_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    e, b, shards = job.estimation, DTYPE_BYTES[job.dtype], job.estimation_shards
    parts = [*dense_weights(shape, job, root=False),  # a unit group gathers its members' weights: at most one layer's
             Part("accumulators", accumulator_bytes(shape, e, shards), shards > 1),
             Part("unit-major copies of one group", _unit_major_copies(shape, e, b)),
             # a scheme's float64 temporaries over the largest member (w, g or F, their product, the sum)
             Part("float64 scoring temporaries", 4 * 8 * _largest(shape, e))]
    if "output_gram" in e.needs:  # obs: Σ, its factor and Σ⁻¹ in float64, and the refit Wᵀ
        n = _widest_output_input(shape, e)
        parts.append(Part("float64 covariance and its inverse", 8 * (3 * n * n + shape.hidden_size * n)))
    if shards > 1:
        parts.append(Part("one layer's statistics gathered", _gathered_layer(shape, e)))
    return StagePeak("scoring", parts, "one unit group at a time" + (
        f", g/g² sharded over {shards}" if shards > 1 else ""))


def fusion_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """Learned fusion: the weights and the accumulators stay alive (the unit groups could be built
    again) while one window's masked forward + backward runs; the masks keep the inputs of
    ``o_proj``/``down_proj``."""
    e, b = job.estimation, DTYPE_BYTES[job.dtype]
    scoring = scoring_peak(shape, job)
    persistent = dense_weights(shape, job, 2) + [p for p in scoring.parts if p.name == "accumulators"]
    tokens, first, masked = e.seq_len, min(e.layers), set(e.layers)
    per_token = sum(_layer_activations(shape, layer, b, (shape.heads(layer) * shape.head_dim + shape.intermediate(layer))
                                       if layer in masked else 0)
                    for layer in range(first, shape.num_hidden_layers))
    parts = persistent + [Part("activations", tokens * per_token), Part("logits", _logits(shape, tokens))]
    if e.fusion_kl:
        parts.append(Part("KL: teacher logits, distributions and their gradients", _kl_logits(shape, tokens, b)))
    return StagePeak("fusion training", parts, "one window per step")


def _layer_inputs(shape: ModelShape, e: EstimationSettings, layer: int) -> list[int]:
    """Input widths of the layer's refit projections: ``o_proj`` (heads × head_dim), ``down_proj``."""
    return ([shape.heads(layer) * shape.head_dim] if e.attention_unit != "none" else []) + [shape.intermediate(layer)]


def _pruned_weights(shape: ModelShape, job: JobSettings, gathered_layers: int = 1) -> list[Part]:
    """The pruned model as the stages after slicing hold it: whole, or (``shard_weights``) this rank's
    shards, the root gathered during a pass and ``gathered_layers`` pruned layers (the dense widths
    scaled by the kept share: the plan's widths are not known before it)."""
    b, kept = DTYPE_BYTES[job.dtype], 1 - job.target_ratio
    if job.weight_shards == 1:
        return [Part("pruned weights", weights(shape, b, kept))]
    outside = shape.parameters() - sum(shape.layer_parameters(i) for i in range(shape.num_hidden_layers))
    return [Part("pruned weights", -(-weights(shape, b, kept) // job.weight_shards), True),
            Part("root gathered (embeddings, head)", outside * b),
            Part(f"pruned decoder layers gathered ({gathered_layers})", int(gathered_layers * _largest_layer(shape) * kept * b))]


def gram_bytes(shape: ModelShape, e: EstimationSettings) -> int:
    """``X Xᵀ`` and ``Σ X`` (float64) of the largest layer's refit projections, which independent
    reconstruction accumulates together (``reconstruction.dense_grams``)."""
    return max(sum(8 * (m * m + m) for m in _layer_inputs(shape, e, layer)) for layer in e.layers)


def solve_bytes(inputs: int, outputs: int) -> int:
    """The refit of an ``outputs × inputs`` projection (``reconstruction.solve_refit``), float64, the
    kept inputs ``k`` bounded by ``inputs``: ``X Xᵀ`` (the target moments), the cross moments and the
    kept Gram and their copies with the intercept's row, ``G + λI`` and its Cholesky factor while it
    factors (7 matrices of ``k²`` or ``n·k``), and the dense weight, ``W M`` and the sliced weight."""
    return 8 * (7 * inputs * inputs + 3 * outputs * inputs)


def teacher_bytes(d: DistillationSettings) -> int:
    """The teacher's top-k ids (int64) and log-probabilities (float32) and its rest's log-mass, per position."""
    return d.windows * d.seq_len * (12 * d.top_k + 4)


def distillation_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """The dense model's targets (``distillation.teacher_targets``): one batch's logits, their float32
    log-softmax and top-k, beside the dense weights and the targets kept so far."""
    d, b = job.distillation, DTYPE_BYTES[job.dtype]
    tokens = d.batch_size * d.seq_len
    return StagePeak("distillation", [*dense_weights(shape, job), Part("teacher targets", teacher_bytes(d)),
                                      Part("logits", tokens * shape.vocab_size * (b + 2 * 4))], "dense, before slicing")


def width_search_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """The width search (``width_search.search_widths``) holds ``X Xᵀ`` and ``Σ X`` (float64) of every
    pruned output projection's input, two masked copies of those projections' weights (the best
    state and the proposal being judged), the hidden states of the distillation windows at every layer from the first
    pruned one (and of the search windows, when fewer), one batch's logits and log-softmax, and
    one refit's solve, beside the dense weights and the teacher."""
    d, e, b = job.distillation, job.estimation, DTYPE_BYTES[job.dtype]
    moments = sum(8 * (m * m + m) for layer in e.layers for m in _layer_inputs(shape, e, layer))
    masked = 2 * sum(shape.hidden_size * m * b for layer in e.layers for m in _layer_inputs(shape, e, layer))
    depth = shape.num_hidden_layers - min(e.layers) + 1
    windows = d.windows + (d.search_windows if d.search_windows < d.windows else 0)
    widest = max(m for layer in e.layers for m in _layer_inputs(shape, e, layer))
    return StagePeak("width search", [
        *dense_weights(shape, job), Part("teacher targets", teacher_bytes(d)), Part("dense moments", moments),
        Part("masked projections", masked), Part("cached hidden states", depth * windows * d.seq_len * shape.hidden_size * 4),
        Part("logits", d.search_batch_size * d.seq_len * shape.vocab_size * 3 * 4),
        Part("one refit", solve_bytes(widest, shape.hidden_size)),
    ], f"{d.search_windows} windows per candidate, {d.windows} per proposal")


def reconstruction_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """Independent mode runs the dense layers one at a time over the cached hidden states of the
    rank's windows (``layer_stream.LayerStream``) and holds ``X Xᵀ`` (float64) of one layer's pruned
    projections' inputs (``o_proj``, ``down_proj``) while it accumulates them, then solves them one
    at a time and drops them: the peak is the larger of the two phases. The refit weights wait for
    the slicing: whole, or with ``shard_weights`` this rank's rows of them. Sequential mode streams
    the pruned model the same way and holds a dense copy of the pruned blocks and one structure's
    moments at a time. With ``shard_weights`` both run on sharded models (windows padded to one count
    per rank): independent on the dense one, sequential on the pruned one, its dense copies sharded
    until each structure's turn."""
    e, r, b = job.estimation, job.reconstruction, DTYPE_BYTES[job.dtype]
    n = max(m for layer in e.layers for m in _layer_inputs(shape, e, layer))
    out = shape.hidden_size
    tokens = r.seq_len
    sharded = job.weight_shards > 1
    if sharded and r.mode == "sequential":
        parts = [*_pruned_weights(shape, job),
                 Part("the dense shards until setup ends", -(-weights(shape, b) // job.weight_shards), True)]
    else:
        parts = dense_weights(shape, job)
    layer_forward = r.batch_size * tokens * b * (3 * shape.intermediate_size + 4 * shape.hidden_size)
    solve = Part("largest solve", solve_bytes(n, out))
    windows = -(-r.num_windows // job.world_size)  # this rank's share (sharded: every rank padded to it)
    hidden = windows * tokens * shape.hidden_size * b
    if r.mode == "sequential":
        dense = sum(sum(o * i for name, (o, i) in shape.layer_linears(layer).items()
                        if e.attention_unit != "none" or name in ("gate_proj", "up_proj", "down_proj"))
                    for layer in e.layers) * b
        if sharded:  # the copies keep their shards; one structure (at most a layer) is gathered at a time
            parts += [Part("dense copy of the pruned blocks", -(-dense // job.weight_shards), True),
                      Part("one dense structure gathered", _largest_layer(shape) * b)]
        else:
            parts.append(Part("dense copy of the pruned blocks", dense))
        moments = 8 * 3 * n * n
        if r.folds > 1:  # per fold; their total; one fold's held-out and training moments (with the intercept's row)
            parts.append(Part(f"one structure's moments in {r.folds} folds and their total", (r.folds + 3) * moments))
        parts += [Part("one structure's moments", moments + 12 * n * n),
                  Part("cached hidden states", hidden),
                  Part("forward of one batch through one layer", 2 * layer_forward), solve]
        if r.kl_windows and job.distillation is not None:  # the judge: its windows' hidden states, cached and run
            d = job.distillation
            judged = -(-r.kl_windows // job.world_size)
            parts += [Part("teacher targets", teacher_bytes(d)),
                      Part("judge windows' hidden states", 2 * judged * d.seq_len * shape.hidden_size * 4),
                      Part("logits", min(d.batch_size, judged) * d.seq_len * shape.vocab_size * 3 * 4)]
        return StagePeak("reconstruction", parts, "sequential: one structure's moments at a time")
    parts += [Part("cached hidden states", hidden), _waiting_refits(shape, job)]
    accumulating = [Part("Gram matrices (float64, one layer)", gram_bytes(shape, e)), Part("float32 product of a batch", 12 * n * n),
                    Part("forward of one batch through one layer", layer_forward)]
    if solve.bytes >= sum(p.bytes for p in accumulating):  # the widest solve holds its own X Xᵀ
        return StagePeak("reconstruction", parts + [solve], "independent: at the widest solve (X Xᵀ of one layer at a time)")
    return StagePeak("reconstruction", parts + accumulating, "independent: accumulating one layer's X Xᵀ")


def _waiting_refits(shape: ModelShape, job: JobSettings) -> Part:
    """Independent mode's refit weights of every pruned projection, from the solves to the slicing;
    with ``shard_weights`` this rank's rows (``sharded_model.keep_sharded_like``)."""
    e, b = job.estimation, DTYPE_BYTES[job.dtype]
    # kept inputs are not known before the plan: the dense widths scaled by the kept share
    refits = sum(int(shape.hidden_size * m * (1 - job.target_ratio)) * b
                 for layer in e.layers for m in _layer_inputs(shape, e, layer))
    if job.weight_shards == 1:
        return Part("refit weights until slicing", refits)
    return Part("refit weights until slicing", -(-refits // job.weight_shards), True)


def slicing_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """``shard_weights`` only: the pruned model is built one gathered dense layer at a time beside
    the dense shards, each pruned layer sharded as soon as it is built (and the independent refits
    of its projections gathered and written in first), the root whole until it is sharded last
    (``gathered_slicing.sharded_pruned``)."""
    b, kept = DTYPE_BYTES[job.dtype], 1 - job.target_ratio
    outside = shape.parameters() - sum(shape.layer_parameters(i) for i in range(shape.num_hidden_layers))
    parts = [Part("weights", -(-weights(shape, b) // job.weight_shards), True),
             Part("pruned weights", -(-weights(shape, b, kept) // job.weight_shards), True),
             Part("root whole until sharded (embeddings, head)", outside * b),
             Part("one dense layer gathered", _largest_layer(shape) * b),
             Part("one pruned layer whole", int(_largest_layer(shape) * kept * b))]
    r = job.reconstruction
    if r is not None and r.mode == "independent":
        parts.append(_waiting_refits(shape, job))
    return StagePeak("slicing", parts, "one dense layer gathered and one pruned layer whole at a time")


def export_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """``shard_weights`` only: every rank gathers the pruned model one tensor at a time, rank 0 moves
    each to its host before the next (``gathered_copy.gathered_copy``; the host copy is not planned)."""
    b = DTYPE_BYTES[job.dtype]
    largest = max(max(o * i for o, i in shape.layer_linears(layer).values()) for layer in range(shape.num_hidden_layers))
    largest = max(largest, shape.vocab_size * shape.hidden_size)
    return StagePeak("export", [_pruned_weights(shape, job)[0], Part("one tensor gathered", largest * b)],
                     "rank 0 writes; the pruned model whole only in its host memory")


def perplexity_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """The dense baseline (when not cached) is measured on the dense weights, the pruned model's on
    the pruned ones (with ``shard_weights`` both sharded, every rank taking part); each batch's
    logits, their contiguous float32 copy (``perplexity.perplexity``) and torchmetrics' softmax are
    vocabulary-sized."""
    p, b = job.perplexity, DTYPE_BYTES[job.dtype]
    tokens = p.batch_size * p.seq_len
    weights_held = max(dense_weights(shape, job), _pruned_weights(shape, job), key=lambda ps: sum(x.bytes for x in ps))
    return StagePeak("perplexity", [
        *weights_held,
        Part("logits", tokens * shape.vocab_size * (b + 2 * 4)),
        Part("forward of one batch", tokens * b * (3 * shape.intermediate_size + 4 * shape.hidden_size)),
    ], "the dense baseline first, on the dense weights, then the pruned" + (
        f" (both sharded over {job.weight_shards})" if job.weight_shards > 1 else ""))


def recovery_peak(shape: ModelShape, job: JobSettings) -> StagePeak:
    """LoRA: frozen pruned weights, adapters with their gradients and AdamW's two states (all in the
    model dtype: ``lora.add_lora`` keeps it), activations for the rank's share of the batch; FSDP
    shards weights, adapters, gradients and states over every rank and gathers one decoder layer
    at a time (two with prefetch)."""
    rc, b, world = job.recovery, DTYPE_BYTES[job.dtype], job.world_size
    kept = 1.0 - job.target_ratio
    shards = world if rc.fsdp else 1
    adapters = sum(rc.r * (out + inp) for layer in range(shape.num_hidden_layers)
                   for name, (out, inp) in shape.layer_linears(layer).items() if name in rc.target_modules)
    parts = [Part("weights", weights(shape, b, kept) // shards, rc.fsdp),
             Part("adapters + gradients + AdamW states", 4 * adapters * b // shards, rc.fsdp)]
    if rc.teacher:  # frozen, sharded like the student under FSDP, whole on every DDP rank
        parts.append(Part("teacher weights (dense)", weights(shape, b) // shards, rc.fsdp))
    if rc.fsdp:
        largest_layer = max(shape.layer_parameters(i) for i in range(shape.num_hidden_layers))
        parts.append(Part("gathered decoder layers (2)", int(2 * largest_layer * kept * b)))
    elif world > 1:
        parts.append(Part("DDP gradient buckets", adapters * b))
    tokens = max(rc.batch_size // world, 1) * rc.seq_len
    per_layer = []
    for layer in range(shape.num_hidden_layers):
        linears = shape.layer_linears(layer)
        targets = [name for name in linears if name in rc.target_modules]
        if rc.dropout > 0:  # every adapter keeps its own dropped input (and a one-byte mask)
            inputs = sum(linears[name][1] for name in targets) * (b + 1)
        else:  # q/k/v share one input, gate/up another
            shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}
            inputs = sum({shared.get(name, name): linears[name][1] for name in targets}.values()) * b
        # pruned widths are not known before the plan: the dense layer's, scaled by the kept share
        per_layer.append(int((_layer_activations(shape, layer, b, 0) + inputs) * kept))
    if rc.activation_checkpointing:
        activations = tokens * (shape.num_hidden_layers * shape.hidden_size * b + max(per_layer))
    else:
        activations = tokens * sum(per_layer)
    parts += [Part("activations" + (" (checkpointed)" if rc.activation_checkpointing else ""), activations),
              Part("logits", _logits(shape, tokens))]
    if rc.kl:  # vocabulary-sized (the logits' gradient summed with the LM loss's)
        parts.append(Part("KL: teacher logits, distributions and their gradients", _kl_logits(shape, tokens, b)))
    compared = shape.num_hidden_layers if rc.hidden_layers is None else rc.hidden_layers
    if compared:  # every hidden state the teacher returns, and one float32 difference per compared layer
        parts.append(Part("hidden-state term: teacher hidden states, differences",
                          tokens * shape.hidden_size * ((shape.num_hidden_layers + 1) * b + compared * 4)))
    note = f"FSDP over {world} ranks" if rc.fsdp else ("DDP: every rank holds the model" if world > 1 else "one device")
    return StagePeak("recovery", parts, note)


def runtime_part(job: JobSettings) -> Part:
    return Part("runtime", GPU_RUNTIME_BYTES if job.accelerator == "gpu" else CPU_RUNTIME_BYTES)


def plan_memory(shape: ModelShape, job: JobSettings) -> MemoryPlan:
    """Every stage the job runs, in order, each with the runtime added."""
    plan = MemoryPlan(shape, job)
    if job.estimation is not None:
        if job.estimation.needs:
            plan.stages.append(estimation_peak(shape, job))
            plan.stages.append(scoring_peak(shape, job))
        if job.estimation.learned_fusion:
            plan.stages.append(fusion_peak(shape, job))
        if job.distillation is not None:
            plan.stages.append(distillation_peak(shape, job))
            if job.distillation.search:
                plan.stages.append(width_search_peak(shape, job))
        if job.reconstruction is not None and job.reconstruction.mode == "independent":
            plan.stages.append(reconstruction_peak(shape, job))  # before slicing
        if job.weight_shards > 1:
            plan.stages.append(slicing_peak(shape, job))
        if job.reconstruction is not None and job.reconstruction.mode != "independent":
            plan.stages.append(reconstruction_peak(shape, job))  # after slicing
    if job.recovery is not None:
        plan.stages.append(recovery_peak(shape, job))
    if job.perplexity is not None:
        plan.stages.append(perplexity_peak(shape, job))
    if job.estimation is not None and job.weight_shards > 1:
        plan.stages.append(export_peak(shape, job))
    for stage in plan.stages:
        stage.parts.append(runtime_part(job))
    return plan
