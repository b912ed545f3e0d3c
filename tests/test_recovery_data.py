"""Recovery data: Alpaca prompts and response-only labels, padding, sharding that does not depend on
the number of processes, resuming part-way through an epoch."""

from __future__ import annotations

import json

import pytest
import torch

from hywia_lightning.core.lm_loss import IGNORE_INDEX, scored_tokens
from hywia_lightning.data.instruction_data import (
    PROMPT_NO_INPUT, alpaca_prompt, read_instructions, tokenize_instruction,
)
from hywia_lightning.data.recovery_data import RecoveryData, ResumableSampler

RECORDS = [
    {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def test_alpaca_prompt_uses_the_input_section_only_when_there_is_input():
    assert alpaca_prompt(RECORDS[0]) == PROMPT_NO_INPUT.format(instruction="Name a prime number.")
    with_input = alpaca_prompt(RECORDS[1])
    assert "### Input:\n2 and 3\n\n### Response:\n" in with_input


def test_only_response_tokens_are_scored(tiny_tokenizer):
    example = tokenize_instruction(tiny_tokenizer, RECORDS[1], cutoff_len=512)
    prompt_len = len(tiny_tokenizer(alpaca_prompt(RECORDS[1]), add_special_tokens=False)["input_ids"])
    assert (example["labels"][:prompt_len] == IGNORE_INDEX).all()
    response = example["labels"][prompt_len:]
    assert (response != IGNORE_INDEX).all() and response[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(response[:-1]) == "5"
    everything = tokenize_instruction(tiny_tokenizer, RECORDS[1], cutoff_len=512, train_on_inputs=True)
    assert torch.equal(everything["labels"], everything["input_ids"])
    cut = tokenize_instruction(tiny_tokenizer, RECORDS[1], cutoff_len=10)
    assert cut["input_ids"].numel() == cut["labels"].numel() == 10


def test_json_list_and_jsonl_read_alike_and_bad_records_name_their_place(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert read_instructions(str(tmp_path / "a.json"), "k") == read_instructions(str(tmp_path / "a.jsonl"), "k") == RECORDS
    (tmp_path / "bad.json").write_text(json.dumps([RECORDS[0], {"instruction": "x", "output": 3}]))
    with pytest.raises(ValueError, match=r"bad.json record 1 lacks the Alpaca field\(s\) output"):
        read_instructions(str(tmp_path / "bad.json"), "data.source")
    (tmp_path / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        read_instructions(str(tmp_path / "broken.jsonl"), "data.source")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'; allowed: .json, .jsonl"):
        (tmp_path / "a.txt").write_text("x")
        read_instructions(str(tmp_path / "a.txt"), "data.source")


def test_collate_pads_without_scoring_padding(tiny_tokenizer):
    data = RecoveryData("unused.jsonl", format="alpaca")
    data.pad_id = tiny_tokenizer.pad_token_id
    examples = [tokenize_instruction(tiny_tokenizer, r, 512) for r in RECORDS]
    batch = data.collate(examples)
    lengths = [e["input_ids"].numel() for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert scored_tokens(batch) == sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in examples)


def test_shards_of_n_processes_make_up_the_single_process_batches():
    """Step k on N ranks sees exactly the examples of step k of one process with the same global batch."""
    global_batch, size = 4, 23
    single = list(ResumableSampler(size, 1, 0, seed=3))
    for world in (2, 4):
        shards = [list(ResumableSampler(size, world, rank, seed=3)) for rank in range(world)]
        per_rank = global_batch // world
        for step in range(size // global_batch):
            together = sorted(i for shard in shards for i in shard[step * per_rank:(step + 1) * per_rank])
            assert together == sorted(single[step * global_batch:(step + 1) * global_batch])
    epoch_1 = ResumableSampler(size, 1, 0, seed=3)
    epoch_1.set_epoch(1)
    assert list(epoch_1) != single, "every epoch is shuffled anew"


def test_a_resumed_epoch_starts_after_the_last_trained_example():
    sampler = ResumableSampler(10, 1, 0, seed=0)
    full = list(sampler)
    sampler.start = 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full, "only the resumed epoch starts part-way"


def test_bad_settings_are_refused_with_the_key():
    with pytest.raises(ValueError, match="format='chat' is unknown; allowed: alpaca, text"):
        RecoveryData("x.jsonl", format="chat")
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)  # what LightningCLI parses the YAML with
    parser.add_class_arguments(RecoveryData, "data")
    for key, value in (("batch_size", 0), ("seq_len", 0), ("val_size", -1), ("max_examples", 0)):
        with pytest.raises(ArgumentError, match=rf'Parser key "data.{key}"'):
            parser.parse_args(["--data.source", "x.jsonl", f"--data.{key}", str(value)])
    with pytest.raises(FileNotFoundError, match="data.source='missing.txt'"):
        RecoveryData("missing.txt", format="text").check()


def test_merging_from_a_state_dict_equals_peft_in_place_and_keeps_tied_embeddings():
    from peft import LoraConfig

    from hywia_lightning.recovery.lora import add_lora, merge_lora

    from .conftest import tiny_llama

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    trained = add_lora(tiny_llama(tie_word_embeddings=True), config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    merged, adapter = merge_lora(trained.get_base_model(), config, trained.state_dict())
    assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
    assert merged.config.tie_word_embeddings
    assert adapter and all("lora_" in k for k in adapter)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
