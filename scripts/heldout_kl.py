"""The KL to the dense model of any exported model, on the benchmark's held-out calibration windows.

    python scripts/heldout_kl.py runs/bench/hywia_default_cal_generated128_20/export ...

Why: a row that measures the KL in its own job (``pruning.distillation``) measures it on held-out
windows of its own calibration source; rows calibrated on other text, recovered, or pruned by
other tools need one yardstick. This is it: the mean KL(p_dense ‖ q) per position (the teacher's
top ``--top-k`` plus one bucket, as :mod:`hywia_lightning.core.distillation` defines it) on the
last ``--windows`` windows of ``--source`` in the seed's order (the windows the benchmark's
``distillation`` rows hold out: disjoint from every row's calibration windows), and on those from
``--unseen-from`` on. Prints one JSON line per export.
"""

from __future__ import annotations

import argparse
import json

from hywia_lightning.core.distillation import DistillationSet
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.models.loading import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="exported model folders (or hub ids / bundled: names)")
    parser.add_argument("--teacher", default="bundled:SmolLM2-135M-Instruct", help="the dense model")
    parser.add_argument("--source", default="../shared/data/wikitext-2/valid.txt", help="text of the held-out windows")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows (the last of the seed's order)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probabilities kept per position")
    parser.add_argument("--unseen-from", type=int, default=16, help="also the KL on the windows from this one on")
    args = parser.parse_args()
    teacher, tokenizer = load_causal_lm(args.teacher)
    data = CalibrationData(source=args.source, num_windows=args.windows, seq_len=args.seq_len, seed=args.seed)
    data.attach(tokenizer, teacher)
    distill = DistillationSet.of(teacher, data.held_out_windows(args.windows), args.top_k)
    del teacher
    for export in args.exports:
        per_window = distill.kl_per_window(load_causal_lm(export)[0]).double()
        print(json.dumps({"export": export, "windows": args.windows, "kl": round(float(per_window.mean()), 4),
                          f"kl_from_{args.unseen_from}": round(float(per_window[args.unseen_from:].mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()
