"""The memory plan of a job, before anything is loaded: each stage's peak per rank, and whether it fits.

    python scripts/memory_plan.py --config configs/prune_llama.yaml [--pruning.init_args.accumulate_dtype bfloat16] [--device-gib 80]

The job's ``--config`` files and overrides are read as ``main.py fit`` reads them, without its parser
(hywia_lightning/job_config.py: importing the parser's Lightning costs more than the 10 s this
should take; nothing is instantiated, no weight is read, keys are not validated: ``main.py fit``
parses them and checks the same plan before loading), the model's shape comes from its
``config.json``, the bundled model's shipped shape, the Hugging Face cache or the shapes shipped for
common hub models (hywia_lightning/models/shapes.py), never from the network. It prints a table per
stage and, as its last line, one JSON object: ``peak_gib`` (the largest per-rank peak over the
stages), ``fits`` (for ``--device-gib``, default: the smallest visible GPU, or on a CPU the
machine's RAM divided over the job's processes) and every stage's parts in GiB.
Exit code 0 when it fits, 1 when it does not, 2 when the plan cannot be made offline.
"""

from __future__ import annotations

import json
import sys


def split_args(argv: list[str]) -> tuple[float | None, list[str]]:
    """``--device-gib`` is this script's; everything else is the job's."""
    device_gib, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--device-gib":
            device_gib, i = float(argv[i + 1]), i + 2
        elif argv[i].startswith("--device-gib="):
            device_gib, i = float(argv[i].split("=", 1)[1]), i + 1
        else:
            rest.append(argv[i])
            i += 1
    return device_gib, rest


def table(plan) -> str:
    lines = []
    for stage in plan.stages:
        lines.append(f"{stage.stage}: {stage.gib:.2f} GiB per rank ({stage.note})")
        for part in stage.parts:
            mark = " (sharded)" if part.sharded else ""
            lines.append(f"    {part.name:<42} {part.bytes / 2**30:9.3f} GiB{mark}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    device_gib, job_args = split_args(argv)
    if "-h" in job_args or "--help" in job_args:
        print(__doc__)
        return 0
    from hywia_lightning.input_errors import InputError
    from hywia_lightning.job_config import read_job
    from hywia_lightning.memory_plan.job import device_bytes, job_plan

    try:
        config = read_job(job_args)
    except InputError as error:
        print(error, file=sys.stderr)
        print(json.dumps({"peak_gib": None, "fits": None, "error": str(error).splitlines()[0]}))
        return 2
    try:
        planned = job_plan(config)
    except ValueError as error:  # keys the model cannot take (a layer range beyond its depth)
        print(f"error: {error}", file=sys.stderr)
        print(json.dumps({"peak_gib": None, "fits": None, "error": str(error)}))
        return 2
    if planned is None:
        model = config.get("model", {}).get("init_args", {}).get("model_name_or_path")
        print(f"the shape of {model!r} is not known offline: give a local folder with its config.json "
              "(or add it to hywia_lightning/models/shapes.py)")
        print(json.dumps({"peak_gib": None, "fits": None, "model": model}))
        return 2
    plan, job = planned.plan, planned.plan.job
    if device_gib is not None:
        limit, source = device_gib * 2**30, "--device-gib"
    else:
        limit, source = device_bytes(job)
        if limit is None:  # a GPU job planned on a machine without one
            from dataclasses import replace

            limit, source = device_bytes(replace(job, accelerator="cpu"))
            source += " (no GPU visible: pass --device-gib)"
    shape = plan.shape
    print(f"model {planned.model}: {shape.parameters() / 1e9:.2f}B parameters, {shape.num_hidden_layers} layers, "
          f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size} (shape from {planned.shape_source})")
    print(f"ranks: {job.devices} device(s) × {job.num_nodes} node(s) = {job.world_size}; weights {job.dtype}"
          + (f", accumulators {job.estimation.accumulate_dtype}, estimation batch {job.estimation.batch_size}"
             if job.estimation else ""))
    print(table(plan))
    fits = plan.fits(limit)
    print(f"peak {plan.peak_gib:.2f} GiB per rank ({plan.peak.stage if plan.peak else '-'}); "
          f"{limit / 2**30:.1f} GiB per device ({source}): {'fits' if fits else 'DOES NOT FIT'}")
    print(json.dumps({**plan.to_dict(), "fits": fits, "device_gib": round(limit / 2**30, 3), "device": source,
                      "model": planned.model, "shape_source": planned.shape_source}))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
