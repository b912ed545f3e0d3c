"""Command line: ``python main.py fit --config configs/prune_smollm2.yaml``."""

from hywia_lightning.cli import HywiaCLI

if __name__ == "__main__":
    HywiaCLI()
