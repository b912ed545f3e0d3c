"""Convert an export folder (or any Llama/Mistral/Qwen2 Hugging Face folder) to one GGUF file for llama.cpp.

    python scripts/export_gguf.py runs/prune_smollm2/export runs/prune_smollm2/model.gguf --dtype float16

Per-layer widths become llama.cpp's ``deci`` architecture, uniform widths ``llama``
(hywia_lightning/export/gguf.py says why and how). ``--dtype``: float16 (default), bfloat16, float32,
q8_0; llama.cpp's ``llama-quantize`` takes the float16 file to its other types.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hywia_lightning.export.gguf import DTYPES, export_gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="a Hugging Face folder: config.json, *.safetensors, tokenizer")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="type of the weight matrices")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_gguf(args.export_dir, args.out, args.dtype)


if __name__ == "__main__":
    main()
