"""WikiText-2 perplexity of Hugging Face folders, measured without this project's code.

    python scripts/external_perplexity.py runs/prune_smollm2/export ~/.cache/hywia_lightning/SmolLM2-135M-Instruct

A check from outside the project (issue 16's acceptance): each folder is loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; the lines of
``test.txt`` are joined by blank lines (as the project reads a .txt), tokenized once without
special tokens, cut into the first ``--chunks`` non-overlapping chunks of ``--seq-len`` tokens;
the perplexity is exp of the mean next-token negative log-likelihood over every predicted token.
The first folder is the one judged; with a second (the dense model) it prints the ratio.
Nothing here imports ``hywia_lightning``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def perplexity(folder: str, text: str, seq_len: int, chunks: int, batch_size: int = 8) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.numel() < chunks * seq_len:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than {chunks} x {seq_len}")
    data = ids[: chunks * seq_len].reshape(chunks, seq_len)
    total, count = 0.0, 0
    for batch in data.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total, count = total + nll.item(), count + batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="the model to judge, then optionally the dense model")
    parser.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=64)
    args = parser.parse_args()
    text = "\n\n".join(Path(args.text).read_text(encoding="utf-8").splitlines())
    values = {folder: perplexity(str(Path(folder).expanduser()), text, args.seq_len, args.chunks) for folder in args.folders}
    result = {"text": args.text, "chunks": args.chunks, "seq_len": args.seq_len, "perplexity": values}
    if len(args.folders) > 1:
        result["ratio_to_dense"] = values[args.folders[0]] / values[args.folders[1]]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
