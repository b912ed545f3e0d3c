"""Command line: ``python main.py fit --config configs/prune_smollm2.yaml``.

A refused input ends in one paragraph and exit code 2; ``HYWIA_TRACEBACK=1`` shows the full report."""

from callbacks import STAGES
from hywia_lightning.cli import HywiaCLI
from hywia_lightning.input_errors import main

if __name__ == "__main__":
    main(lambda: HywiaCLI(stages=STAGES))
