import json

import pytest
import torch

from hywia_lightning.data.calibration import CalibrationData, token_windows
from hywia_lightning.data.text_sources import read_text


def test_windows_are_seeded_distinct_and_of_the_requested_shape():
    ids = torch.arange(1000)
    a, b, c = (token_windows(ids, 8, 16, seed) for seed in (0, 0, 1))
    assert a.shape == (8, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 8 and all(s % 16 == 0 for s in starts)  # non-overlapping chunks


def test_builtin_corpus_splits_do_not_overlap():
    train, test = read_text("builtin:python-docs/train", "k"), read_text("builtin:python-docs/test", "k")
    assert len(train) > 3 * len(test) > 200_000
    assert test[:2000] not in train


def test_jsonl_text_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"document number {i} " * 20}) for i in range(20)))
    data = CalibrationData(str(path), num_windows=3, seq_len=8, text_field="content")
    data.attach(tiny_tokenizer)
    assert data.windows().shape == (3, 8)
    assert next(iter(data.train_dataloader()))[0].shape == (1, 8)


def test_windows_need_a_tokenizer():
    with pytest.raises(RuntimeError, match="attach"):
        CalibrationData("builtin:python-docs/train", 2, 8).windows()


def test_wikitext_lines_are_joined_with_blank_lines(wikitext_valid):
    text = read_text(str(wikitext_valid), "k")
    assert text.count("\n\n") >= len(wikitext_valid.read_text().splitlines()) - 1
