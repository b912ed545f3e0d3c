"""``source: generated``: calibration windows the dense model samples itself, cached on disk."""

import json

import pytest
import torch

import hywia_lightning.data.calibration as calibration
from hywia_lightning.data.calibration import CalibrationData, split_count
from hywia_lightning.data.generation_cache import generation_key, generation_path
from hywia_lightning.data.self_generation import ConversationScript, Generation, sample_windows
from hywia_lightning.distributed.collective import Collective
from hywia_lightning.input_errors import InputError

from .conftest import tiny_llama, train_tiny_tokenizer
from .pipeline import prune_job, run_fit


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def generated(tokenizer, model, cache, **kwargs) -> CalibrationData:
    data = CalibrationData(kwargs.pop("source", "generated"), kwargs.pop("num_windows", 4), kwargs.pop("seq_len", 12),
                           cache_dir=str(cache), **kwargs)
    data.attach(tokenizer, model)
    return data


def test_sampling_is_deterministic_for_a_seed_and_never_draws_special_tokens(model, tiny_tokenizer):
    settings = Generation(batch_size=3)
    state = torch.random.get_rng_state()
    a, b = (sample_windows(model, tiny_tokenizer, 5, 10, 0, settings) for _ in range(2))
    c = sample_windows(model, tiny_tokenizer, 5, 10, 1, settings)
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: the global stream is untouched
    assert a.shape == (5, 10) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.isin(a, torch.tensor(tiny_tokenizer.all_special_ids)).any()
    assert len({tuple(row.tolist()) for row in a}) == 5  # independent samples


def test_a_cache_hit_reuses_the_file_without_generating(model, tiny_tokenizer, tmp_path, monkeypatch):
    first = generated(tiny_tokenizer, model, tmp_path)
    windows = first.windows()
    files = list((tmp_path / "calibration").glob("generated-*.pt"))
    assert len(files) == 1 and first.describe()["generation"]["cached"] is False
    assert not list((tmp_path / "calibration").glob(".*"))  # the atomic write left no temporary file

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again despite the cache")

    monkeypatch.setattr(calibration, "sample_windows", no_generation)
    second = generated(tiny_tokenizer, model, tmp_path)
    assert torch.equal(second.windows(), windows)
    assert second.describe()["generation"]["cached"] is True
    assert second.describe()["generation"]["cache_file"] == str(files[0])


@pytest.mark.parametrize("change", [{"seed": 1}, {"num_windows": 5}, {"seq_len": 13},
                                    {"generation": Generation(temperature=0.7)}, {"generation": Generation(top_p=0.5)},
                                    {"generation": Generation(batch_size=2)}])
def test_a_changed_key_misses_the_cache(change, model, tiny_tokenizer, tmp_path):
    generated(tiny_tokenizer, model, tmp_path).windows()
    changed = generated(tiny_tokenizer, model, tmp_path, **change)
    changed.windows()
    assert changed.describe()["generation"]["cached"] is False
    assert len(list((tmp_path / "calibration").glob("generated-*.pt"))) == 2


def test_the_key_names_the_model_and_its_files(tiny_model_dir, tmp_path):
    key = generation_key(str(tiny_model_dir), 4, 12, 0, Generation())
    assert key["model"] == str(tiny_model_dir.resolve()) and key["model_files"]
    other = generation_key(str(tmp_path), 4, 12, 0, Generation())
    assert generation_path(key, tmp_path) != generation_path(other, tmp_path)


def test_a_file_with_another_key_is_not_used(model, tiny_tokenizer, tmp_path):
    data = generated(tiny_tokenizer, model, tmp_path)
    data.windows()
    path = next((tmp_path / "calibration").glob("generated-*.pt"))
    stored = torch.load(path, weights_only=True)
    torch.save({**stored, "key": {**stored["key"], "seed": 99}, "windows": stored["windows"] + 1}, path)
    again = generated(tiny_tokenizer, model, tmp_path)
    assert torch.equal(again.windows(), data.windows()) and again.describe()["generation"]["cached"] is False


@pytest.mark.parametrize("settings, key", [
    ({"temperature": 0}, "generation.temperature"), ({"temperature": -1.0}, "generation.temperature"),
    ({"top_p": 0}, "generation.top_p"), ({"top_p": 1.5}, "generation.top_p"),
    ({"top_k": 0}, "generation.top_k"), ({"batch_size": 0}, "generation.batch_size"),
])
def test_bad_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Generation(**settings)


@pytest.mark.parametrize("key, value", [("top_p", 2.0), ("temperature", 0), ("top_k", 0), ("batch_size", -1)])
def test_bad_settings_are_refused_by_the_cli_naming_the_key(key, value, tiny_model_dir, tmp_path):
    """Typed settings: LightningCLI refuses them while parsing, before the model is loaded."""
    job = prune_job(tiny_model_dir, tmp_path, data={"source": "generated", "generation": {key: value}})
    with pytest.raises(InputError) as error:
        run_fit(job, tmp_path)
    assert error.value.key.startswith("data.init_args.generation") and error.value.key.endswith(key)
    assert "(allowed: a value " in str(error.value)


def test_a_misspelled_source_names_generated_as_an_option():
    with pytest.raises(FileNotFoundError, match="data.source='generatd': no such file.*also 'generated'"):
        CalibrationData("generatd", 4, 8).check("data.source")


def test_generation_settings_need_the_generated_source():
    with pytest.raises(ValueError, match="generation=.*no 'generated'"):
        CalibrationData("builtin:python-docs/train", 4, 8, generation=Generation())


def test_a_pruned_or_missing_model_is_refused(tiny_tokenizer, tmp_path):
    data = CalibrationData("generated", 2, 8, cache_dir=str(tmp_path))
    data.attach(tiny_tokenizer)
    with pytest.raises(RuntimeError, match="attach"):
        data.windows()
    pruned = tiny_llama()
    pruned.config.layer_intermediate_size = [96] * 4
    data.attach(tiny_tokenizer, pruned)
    with pytest.raises(RuntimeError, match="already pruned"):
        data.windows()


def test_a_mix_shares_the_windows_evenly(model, tiny_tokenizer, tmp_path):
    assert split_count(7, 2) == [4, 3]
    mix = generated(tiny_tokenizer, model, tmp_path, source=["generated", "builtin:python-docs/train"], num_windows=7)
    alone = generated(tiny_tokenizer, model, tmp_path, num_windows=4)
    windows = mix.windows()
    assert windows.shape == (7, 12) and torch.equal(windows[:4], alone.windows())
    with pytest.raises(ValueError, match="twice"):
        CalibrationData(["generated", "generated"], 4, 8)


def test_under_several_ranks_only_rank_0_builds_the_windows(model, tiny_tokenizer, tmp_path, monkeypatch):
    """Rank 0 generates (or reads the cache) and broadcasts; other ranks take its windows."""
    on_rank_0 = generated(tiny_tokenizer, model, tmp_path)
    sent = []
    on_rank_0.attach(tiny_tokenizer, model, Collective(0, 2, lambda t: t, lambda obj: sent.append(obj) or obj))
    windows = on_rank_0.windows()
    monkeypatch.setattr(calibration, "sample_windows", lambda *a, **k: pytest.fail("rank 1 generated"))
    on_rank_1 = CalibrationData("generated", 4, 12, cache_dir=str(tmp_path / "elsewhere"))
    on_rank_1.attach(tiny_tokenizer, model, Collective(1, 2, lambda t: t, lambda obj: sent[0]))
    assert torch.equal(on_rank_1.windows(), windows)
    assert on_rank_1.describe()["generation"]["cached"] is False  # rank 0's account of it
    assert not (tmp_path / "elsewhere").exists()


def test_a_job_calibrates_on_generated_text_and_reports_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path / "cache"))  # the generated windows and the dense baseline
    job = prune_job(tiny_model_dir, tmp_path, data={"source": "generated"})
    job["reconstruction"] = {"intercept": True}
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    calibration_section = report["pruning"]["calibration"]
    assert calibration_section["source"] == "generated"
    assert calibration_section["generation"]["cached"] is False and calibration_section["generation"]["seconds"] >= 0
    assert len(list((tmp_path / "cache" / "calibration").glob("generated-*.pt"))) == 1
    markdown = (tmp_path / "export" / "report.md").read_text()
    assert "`generated`: sampled from the dense model" in markdown
    assert not report.get("warnings") and "Warning" not in markdown  # evaluated on python-docs, calibrated on generated text


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tiny tokenizer with ChatML's markers as special tokens, and its template."""
    tokenizer = train_tiny_tokenizer("<|im_start|>", "<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def test_the_conversation_script_is_read_from_the_chat_template(chat_tokenizer):
    script = ConversationScript.of(chat_tokenizer)
    assert chat_tokenizer.decode(script.start) == "<|im_start|>user\n"
    assert script.end_of_turn == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_tokenizer.decode(script.to_assistant) == "\n<|im_start|>assistant\n"
    assert chat_tokenizer.decode(script.to_user) == "\n<|im_start|>user\n"


def test_steering_writes_the_next_roles_header_after_each_turn(chat_tokenizer):
    script = ConversationScript.of(chat_tokenizer)
    pending, answering, written = [[]], [False], []
    end, word = script.end_of_turn, 100
    for sampled in [word, end, *[end] * len(script.to_assistant), word, end, *[word] * len(script.to_user)]:
        written.append(int(script.steer(torch.tensor([[sampled]]), pending, answering)[0, 0]))
    header = [end, *script.to_assistant]
    assert written[1 : 1 + len(header)] == header  # the sampled tokens in the header's place are dropped
    second = written.index(end, len(header) + 1)
    assert written[second : second + 1 + len(script.to_user)] == [end, *script.to_user] and answering == [False]


def test_conversations_are_sampled_in_the_template_and_deterministically(chat_tokenizer):
    model = tiny_llama()
    settings = Generation(batch_size=4, conversation=True)
    a, b = (sample_windows(model, chat_tokenizer, 16, 48, 0, settings) for _ in range(2))
    assert a.shape == (16, 48) and torch.equal(a, b)
    script = ConversationScript.of(chat_tokenizer)
    allowed = {script.end_of_turn, *script.to_assistant, *script.to_user}
    specials = torch.tensor([i for i in chat_tokenizer.all_special_ids if i not in allowed])
    assert not torch.isin(a, specials).any()  # no other special token is ever written
    turns = 0
    for row in a.tolist():  # every window starts in the user's turn: its turns end user, assistant, user, ...
        for n, position in enumerate(p for p, token in enumerate(row) if token == script.end_of_turn):
            header = script.to_user if n % 2 else script.to_assistant
            follows = row[position + 1 : position + 1 + len(header)]
            assert follows == header[: len(follows)]  # the window may end inside the header
            turns += 1
    assert turns >= 1  # 768 steps over 300 tokens: some samples end a turn


def test_conversation_needs_a_chat_template(model, tiny_tokenizer, tmp_path):
    data = generated(tiny_tokenizer, model, tmp_path, generation=Generation(conversation=True))
    with pytest.raises(ValueError, match="conversation=true.*tokenizer has none; use conversation: false"):
        data.windows()
    assert not (tmp_path / "calibration").exists()  # refused before any sampling
