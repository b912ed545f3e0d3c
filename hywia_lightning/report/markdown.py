"""``report.md``: the run's report for a person, rendered from the same sections as ``report.json``.

Every number in it is read from the sections (nothing is measured here), so the Markdown and the
JSON cannot disagree. Sections a run did not produce are left out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STAGE_ORDER = ("distillation", "estimation", "scoring", "width_search", "pruning", "reconstruction", "recovery",
               "perplexity", "baseline_perplexity",
               "zeroshot", "baseline_zeroshot", "export")
PLOT_TITLES = {
    "layer_widths.png": "kept widths per layer",
    "fusion_weights.png": "fusion weights per layer",
    "importance.png": "importance distributions per layer and granularity",
    "recovery_loss.png": "recovery loss",
}


def _int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "–"


# lm-eval metrics that are fractions where higher is better: shown in %, with ↑
_FRACTIONS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "f1", "mcc")


def _num(x: Any, digits: int = 2) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "–"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _runs(rows: list[tuple[int, list[str]]]) -> list[list[str]]:
    """Consecutive layers with the same row become one (``4–27``): a 30-layer table stays short."""
    merged: list[tuple[int, int, list[str]]] = []
    for layer, values in rows:
        if merged and merged[-1][2] == values and merged[-1][1] == layer - 1:
            merged[-1] = (merged[-1][0], layer, values)
        else:
            merged.append((layer, layer, values))
    return [[str(a) if a == b else f"{a}–{b}"] + values for a, b, values in merged]


def _summary(s: dict) -> list[str]:
    model, pruning = s.get("model", {}), s.get("pruning")
    lines = []
    name = model.get("model_name_or_path")
    if name:
        lines.append(f"- model: `{name}`" + (f", evaluated by `{model['stage']}`" if model.get("stage") not in (None, "fit") else ""))
    if pruning:
        lines.append(
            f"- parameters: {_int(pruning['params_before'])} → {_int(pruning['params_after'])} "
            f"({100 * pruning['fraction_removed']:.2f}% removed; target {100 * pruning['target_ratio']:.1f}%, "
            "embeddings counted)"
        )
        lines.append(
            f"- method: {pruning['granularity']}, layers {pruning['layers'][0]}–{pruning['layers'][1] - 1}, "
            f"attention unit `{pruning['attention_unit']}`, MLP widths multiples of {pruning['round_to']}"
        )
        calibration = pruning.get("calibration")
        if calibration:
            lines.append(_calibration(calibration))
    elif "params" in model:
        lines.append(f"- parameters: {_int(model['params'])}")
    recon = s.get("reconstruction")
    if recon:
        damping = recon["damping"]
        if isinstance(damping, list):  # chosen per structure by held-out windows
            chosen = Counter(layer["damping"] for layer in recon.get("layers", {}).values())
            judge = (f"the KL to the dense model on {recon['kl_windows']} held-out windows" if recon.get("choose_by") == "kl"
                     else f"{recon.get('folds')} folds of held-out windows")
            damping = (f"chosen from {damping} by {judge} ("
                       + ", ".join(f"{d:g}: {n}" for d, n in sorted(chosen.items())) + " structures)")
        lines.append(f"- reconstruction: {recon['mode']}, damping {damping}, mean relative output error "
                     f"{_num(recon['mean_error_before'], 4)} → {_num(recon['mean_error_after'], 4)}")
    if model.get("export_dir"):
        lines.append(f"- export: `{model['export_dir']}`" + _export_kind(model.get("export")))
    return lines


def _export_kind(export: dict | None) -> str:
    if not export:
        return ""
    how = ("loads with `AutoModelForCausalLM.from_pretrained(dir)`" if export["kind"] == "stock"
           else "loads with `trust_remote_code=True` (its own modeling code)")
    gguf = f"; `{export['gguf']['file']}` ({export['gguf']['dtype']}) for llama.cpp" if export.get("gguf") else ""
    return f", {export['kind']} `{export['architecture']}`: {how}, because {export['reason']}{gguf}"


def _calibration(c: dict) -> str:
    sources = c["source"] if isinstance(c["source"], list) else [c["source"]]
    line = (f"- calibration: {c['num_windows']} windows of {c['seq_len']} tokens from "
            + " + ".join(f"`{s}`" for s in sources) + (" (shared evenly)" if len(sources) > 1 else "")
            + f", seed {c['seed']}")
    g = c.get("generation")
    if g:
        how = ("read from the cache" if g.get("cached") else f"generated in {_num(g.get('seconds'), 1)} s") \
            if "cached" in g else "not built"
        line += (f"; `generated`: sampled from the dense model (temperature {g['temperature']}, top-p {g['top_p']}, "
                 f"among the top {g['top_k']}), {how}")
    return line


def _warnings(s: dict) -> list[str]:
    return [f"> **Warning:** {w}" for w in s.get("warnings") or []] + ([""] if s.get("warnings") else [])


def _evaluation(s: dict) -> list[str]:
    baseline = s.get("baseline", {})
    rows = []
    ppl = s.get("perplexity")
    if ppl:
        dense = baseline.get("perplexity", {}).get("results", {}).get("value")
        ratio = f"×{ppl['value'] / dense:.2f}" if isinstance(dense, (int, float)) and dense > 0 else "–"
        rows.append([f"perplexity ↓ (`{ppl['source']}`, {_int(ppl['tokens'])} tokens)", _num(dense), _num(ppl["value"]), ratio])
    for split in ("val", "test"):
        lm = s.get(f"{split}_language_model")
        if lm:
            rows.append([f"{split}_ppl ↓ (step {lm.get('step', '–')})", "–", _num(lm.get("perplexity")), "–"])
    zeroshot = s.get("zeroshot")
    if zeroshot:
        dense_scores = baseline.get("zeroshot", {}).get("results", {})
        for task, scores in zeroshot.items():
            if not isinstance(scores, dict):
                continue
            for metric, value in scores.items():
                if metric == "items" or metric.split("/")[0].endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                dense = dense_scores.get(task, {}).get(metric)
                known = isinstance(dense, (int, float))
                if metric.split("/")[0] in _FRACTIONS:
                    delta = f"{100 * (value - dense):+.1f}" if known else "–"
                    rows.append([f"{task} {metric} % ↑ (n={scores['items']})", _pct(dense), _pct(value), delta])
                else:  # lm-eval's other metrics (perplexities, bleu, ...): as they are, no direction assumed
                    rows.append([f"{task} {metric} (n={scores['items']})", _num(dense), _num(value),
                                 f"{value - dense:+.3g}" if known else "–"])
    if not rows:
        return []
    lines = ["## Evaluation", ""] + _table(["metric", "dense", "this model", "change"], rows) + [""]
    notes = []
    for kind, entry in baseline.items():
        if isinstance(entry, dict) and entry.get("model"):
            how = "from the cache" if entry.get("cached") else (
                "the evaluated model itself" if entry.get("same_model") else f"measured in {_num(entry.get('seconds'), 1)} s")
            notes.append(f"{kind} of `{entry['model']}`, {how}")
        elif isinstance(entry, dict) and entry.get("skipped"):
            notes.append(f"{kind} not measured ({entry['skipped']})")
    if notes:
        lines += ["Dense model: " + "; ".join(notes) + ".", ""]
    return lines


def _widths(s: dict) -> list[str]:
    pruning = s.get("pruning")
    if not pruning:
        return []
    w = pruning["layer_widths"]
    rows = _runs([(i, [str(h), str(k), _int(c)])
                  for i, (h, k, c) in enumerate(zip(w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]))])
    return ["## Kept widths per layer", ""] + _table(["layers", "query heads", "KV heads", "MLP channels"], rows) + [""]


def _fusion(s: dict) -> list[str]:
    fusion = s.get("fusion")
    if not fusion:
        return []
    schemes = fusion["schemes"]
    by_layer: dict[int, dict[str, list[float]]] = {}
    for name, weights in fusion["weights"].items():
        parts = name.split(".")
        by_layer.setdefault(int(parts[1]), {})[parts[2]] = weights
    kinds = [k for k in ("self_attn", "mlp") if any(k in v for v in by_layer.values())]
    header = ["layers"] + [f"{'attention' if k == 'self_attn' else 'MLP'}: {' / '.join(schemes)}" for k in kinds]
    rows = _runs([(layer, [" / ".join(f"{w:.2f}" for w in by_layer[layer][k]) if k in by_layer[layer] else "–" for k in kinds])
                  for layer in sorted(by_layer)])
    lines = [f"## Fusion weights ({fusion['mode']})", ""] + _table(header, rows) + [""]
    training = fusion.get("training")
    if training:
        objective = {"kl": " (the KL from the unmasked model)", "lm": " (the calibration text's next tokens)"}.get(
            training.get("objective"), "")
        lines += [f"Fusion training{objective}: {training['epochs_run']} epochs, best held-out loss "
                  f"{_num(training['best_held_out_loss'], 4)}, weights moved by up to {_num(training['weights_moved'], 3)}.", ""]
        curves = list(zip(training.get("train_loss_per_epoch", []), training["held_out_loss_per_epoch"]))
        if curves:
            lines += _table(["epoch", "train loss (soft masks)", "held-out loss (hard masks)"],
                            [[str(i + 1), _num(train, 4), _num(held_out, 4)] for i, (train, held_out) in enumerate(curves)])
            lines += [""]
    refit = fusion.get("refit_error")
    if refit:
        chosen, uniform = sum(e["chosen"] for e in refit.values()), sum(e["uniform"] for e in refit.values())
        lines += [f"Compensated fusion: the chosen blends leave {_num(chosen, 4)} of output error after the refit, "
                  f"summed over {len(refit)} groups, against {_num(uniform, 4)} for the uniform blend.", ""]
    return lines


# the recovery's curves in report.json (each [[step, value], ...], in nats) and how they are named
RECOVERY_CURVES = {"loss_curve": "training loss", "kl_curve": "training KL", "lm_curve": "training LM loss",
                   "hidden_curve": "training hidden-state term", "val_loss": "validation LM loss", "val_kl": "validation KL"}


def recovery_curves(recovery: dict) -> list[tuple[str, list]]:
    """(label, curve) of each curve the recovery has; a part equal to the loss (``kl`` or ``lm`` alone) once."""
    loss = recovery.get("loss_curve")
    return [(label, recovery[key]) for key, label in RECOVERY_CURVES.items()
            if recovery.get(key) and (key == "loss_curve" or recovery[key] != loss)]


def _recovery(s: dict) -> list[str]:
    recovery = s.get("recovery")
    if not isinstance(recovery, dict):
        return []
    rows = []
    for label, curve in recovery_curves(recovery):
        rows.append([label, f"{_num(curve[0][1], 4)} (step {curve[0][0]})", f"{_num(curve[-1][1], 4)} (step {curve[-1][0]})"])
    lines = ["## Recovery", ""]
    if rows:
        lines += _table(["", "first", "last"], rows, ["---", "---", "---"]) + [""]
    lora = recovery.get("lora")
    if isinstance(lora, dict):
        lines += ["LoRA: " + ", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in lora.items()), ""]
    loss = recovery.get("loss")
    if isinstance(loss, dict):
        lines += ["Loss: " + ", ".join(f"{k} {v}" for k, v in loss.items() if v is not None), ""]
    scalars = {k: v for k, v in recovery.items() if k not in RECOVERY_CURVES and isinstance(v, (str, int, float, bool))}
    if scalars:
        lines += [", ".join(f"{k}: {v if not isinstance(v, float) else _num(v, 4)}" for k, v in scalars.items()), ""]
    return lines if len(lines) > 2 else []


def _costs(s: dict) -> list[str]:
    seconds = s.get("seconds", {})
    order = [k for k in STAGE_ORDER if k in seconds] + sorted(k for k in seconds if k not in STAGE_ORDER)
    lines = []
    if order:
        rows = [[stage, _num(seconds[stage], 1)] for stage in order]
        lines += ["## Cost", ""] + _table(["stage", "seconds"], rows) + [""]
    memory = s.get("memory", {})
    if memory:
        lines += [", ".join(f"{k.replace('_gib', '').replace('_', ' ')}: {v:.2f} GiB" for k, v in memory.items()), ""]
    return lines


def _plots(s: dict) -> list[str]:
    names = s.get("model", {}).get("plots") or []
    lines = []
    for name in names:
        title = PLOT_TITLES.get(name, name.rsplit(".", 1)[0].replace("_", " "))
        lines += [f"![{title}]({name})", ""]
    return (["## Plots", ""] + lines) if lines else []


def _unseen_kl(distillation: dict) -> float | None:
    """The KL on the windows no choice was judged on (``kl_unseen_by_search`` in reports before the refit could judge)."""
    return distillation.get("kl_unseen", distillation.get("kl_unseen_by_search"))


def _distillation(s: dict) -> list[str]:
    """The final KL to the dense model and, with a width search, what each of its rounds found."""
    distillation, search = s.get("distillation"), s.get("width_search")
    if not distillation:
        return []
    lines = ["## Distillation to the dense model", "",
             f"Mean KL(p_dense ‖ q_pruned) over {_int(distillation.get('tokens'))} next-token positions of "
             f"{distillation.get('windows')} held-out calibration windows (teacher's top {distillation.get('top_k')} "
             f"plus the rest's mass): **{_num(distillation.get('kl'), 4)}**" + (
                 f"; on the {distillation['unseen_windows']} windows no choice was judged on: "
                 f"{_num(_unseen_kl(distillation), 4)}" if _unseen_kl(distillation) is not None else "") + ".", ""]
    if search:
        rows = [[str(r["round"]), _num(r.get("measured_kl"), 4),
                 ", ".join(f"{_num(a['kl'], 4)} ({_int(a['moved_parameters'])}{', kept' if a['accepted'] else ''})"
                           for a in r["attempts"]) or "no trade gains",
                 _num(r.get("chosen_kl"), 4)] for r in search["rounds"][1:]]
        lines += [f"Width search: from the allocation's widths (KL {_num(search['start_kl'], 4)}, candidates' refits "
                  f"damped by {search['damping']}) to KL {_num(search['chosen_kl'], 4)} on the same "
                  f"{search['judge_windows']} windows, after {search['evaluations']} candidates measured on "
                  f"{search['search_windows']} windows in {_num(search['seconds'], 0)} s.", ""]
        lines += _table(["round", "KL around the best (search windows)", "proposals' KL (parameters moved)",
                         "best KL after the round"], rows) + [""]
    return lines


def render_markdown(sections: dict) -> str:
    """The Markdown report of ``sections`` (a :class:`~hywia_lightning.report.run_report.RunReport`'s)."""
    lines = ["# Run report", ""] + _warnings(sections) + _summary(sections) + [""]
    for part in (_evaluation, _distillation, _widths, _fusion, _recovery, _costs, _plots):
        lines += part(sections)
    return "\n".join(lines).rstrip() + "\n"
