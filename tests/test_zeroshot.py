"""Zero-shot evaluation through lm-eval on local JSON-lines data and by lm-eval's registry: the prompts
are lm-eval's standard ones, the scores match a direct log-likelihood comparison and are the same
either way, bad input fails before the model runs."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from hywia_lightning.evaluation.zeroshot import (
    ZEROSHOT_TASKS, evaluate_zeroshot, local_tasks, prepare_tasks, read_items, run_zeroshot, zeroshot_scores,
)
from hywia_lightning.input_errors import InputError, marked

from .conftest import SHARED_DATA, tiny_llama
from .pipeline import prune_job, run_fit

ZEROSHOT_DATA = SHARED_DATA / "zeroshot"
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


@pytest.fixture
def shared_zeroshot() -> Path:
    for task in ("piqa", "arc_easy"):
        if not (ZEROSHOT_DATA / f"{task}.jsonl").is_file():
            pytest.skip(f"shared zero-shot data not found at {ZEROSHOT_DATA / f'{task}.jsonl'}")
    return ZEROSHOT_DATA


def write_items(folder: Path, task: str, items: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return folder


def rendered(task_obj, limit: int) -> list[tuple[list[str], list[str], int]]:
    """Per document, the (contexts, continuations) lm-eval will score, and the gold index."""
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    docs: dict[int, list] = {}
    for instance in sorted(task_obj.instances, key=lambda i: (i.doc_id, i.idx)):
        docs.setdefault(instance.doc_id, [instance.doc, [], []])
        docs[instance.doc_id][1].append(instance.arguments[0])
        docs[instance.doc_id][2].append(instance.arguments[1])
    out = []
    for doc, contexts, continuations in docs.values():
        gold = task_obj.doc_to_text(doc) if task_obj.multiple_input else task_obj.doc_to_target(doc)
        out.append((contexts, continuations, gold))
    return out


def raw_items(task: str, n: int) -> list[dict]:
    with (ZEROSHOT_DATA / f"{task}.jsonl").open() as f:
        return [json.loads(next(f)) for _ in range(n)]


# (a) the prompts are lm-eval's standard ones --------------------------------------------------------

@pytest.mark.parametrize("task,hub_doc", [
    # the fields of the hub datasets lm-eval's YAML was written for, filled from a normalized item
    ("piqa", lambda it: {"goal": it["context"], "sol1": it["choices"][0], "sol2": it["choices"][1], "label": it["label"]}),
    ("arc_easy", lambda it: {
        "question": it["context"], "answerKey": "ABCDE"[it["label"]],
        "choices": {"text": it["choices"], "label": list("ABCDE"[: len(it["choices"])])},
    }),
])
def test_requests_match_lm_evals_standard_prompt(task, hub_doc, shared_zeroshot):
    from lm_eval.utils import apply_template

    standard = yaml.safe_load((LM_EVAL_TASKS / ("piqa/piqa.yaml" if task == "piqa" else "arc/arc_easy.yaml")).read_text())
    assert "target_delimiter" not in standard  # so lm-eval's default " " applies
    items = raw_items(task, 5)
    got = rendered(local_tasks([task], shared_zeroshot)[task], limit=5)
    assert len(got) == 5
    for item, (contexts, continuations, gold) in zip(items, got):
        doc = hub_doc(item)
        context = apply_template(standard["doc_to_text"], doc)
        choices = ast.literal_eval(apply_template(standard["doc_to_choice"], doc))
        target = standard["doc_to_target"]
        expected_gold = doc[target] if target in doc else int(apply_template(target, doc))
        assert contexts == [context] * len(choices)
        assert continuations == [" " + choice for choice in choices]
        assert gold == expected_gold == item["label"]
        # and spelled out, as the task READMEs show it
        assert context == f"Question: {item['context']}\nAnswer:"


HAND_WRITTEN = {
    "boolq": ({"id": "b0", "context": "is the sky blue", "passage": "The sky is blue.", "choices": ["no", "yes"], "label": 1},
              ["The sky is blue.\nQuestion: is the sky blue?\nAnswer:"] * 2, [" no", " yes"], 1),
    "piqa": ({"id": "p0", "context": "Open a jar.", "choices": ["Twist the lid.", "Eat the lid."], "label": 0},
             ["Question: Open a jar.\nAnswer:"] * 2, [" Twist the lid.", " Eat the lid."], 0),
    # lm-eval's hellaswag preprocess: " [title]" -> ". ", other [tags] dropped, double spaces closed
    "hellaswag": ({"id": "h0", "context": "Cooking: [header] A man cracks eggs into a bowl. he",
                   "choices": ["whisks them [title] quickly.", "sleeps."], "label": 0},
                  ["Cooking: A man cracks eggs into a bowl. he"] * 2, [" whisks them. quickly.", " sleeps."], 0),
    "winogrande": ({"id": "w0", "context": "Sam gave the cup to Ann because _ was thirsty.", "choices": ["Sam", "Ann"], "label": 1},
                   ["Sam gave the cup to Ann because Sam", "Sam gave the cup to Ann because Ann"], [" was thirsty."] * 2, 1),
    "arc_easy": ({"id": "e0", "context": "What melts ice?", "choices": ["heat", "cold", "dark"], "label": 0},
                 ["Question: What melts ice?\nAnswer:"] * 3, [" heat", " cold", " dark"], 0),
    "arc_challenge": ({"id": "c0", "context": "Which is a gas?", "choices": ["rock", "steam", "wood", "iron", "salt"], "label": 1},
                      ["Question: Which is a gas?\nAnswer:"] * 5, [" rock", " steam", " wood", " iron", " salt"], 1),
    "openbookqa": ({"id": "o0", "context": "Fire is", "choices": ["hot", "cold", "wet", "blue"], "label": 0},
                   ["Fire is"] * 4, [" hot", " cold", " wet", " blue"], 0),
}


def test_every_paper_task_renders_its_standard_prompt(tmp_path):
    assert set(HAND_WRITTEN) == set(ZEROSHOT_TASKS)
    for task, (item, _, _, _) in HAND_WRITTEN.items():
        write_items(tmp_path, task, [item])
    tasks = local_tasks(list(ZEROSHOT_TASKS), tmp_path)
    for task, (_, contexts, continuations, gold) in HAND_WRITTEN.items():
        assert rendered(tasks[task], limit=1) == [(contexts, continuations, gold)], task


# (b), (c) scores -----------------------------------------------------------------------------------

def test_tiny_model_on_shared_data(tiny_tokenizer, shared_zeroshot):
    scores = evaluate_zeroshot(tiny_llama(), tiny_tokenizer, ["piqa", "arc_easy"], shared_zeroshot, limit=4, batch_size=4)
    assert set(scores) == {"piqa", "arc_easy"}
    for values in scores.values():
        assert values["items"] == 4
        assert 0.0 <= values["acc"] <= 1.0 and 0.0 <= values["acc_norm"] <= 1.0


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens being those of context+continuation
    after the context's (lm-eval's definition)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_scores_equal_a_direct_loglikelihood_comparison(tiny_tokenizer, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HYWIA_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="hywia_lightning.progress")
    model = tiny_llama()
    questions = [
        ("What melts ice?", ["heat", "the cold of a winter night", "dark"]),
        ("Where do fish live?", ["in water", "in trees"]),
        ("What do bees make?", ["honey", "steel", "glass bottles", "music"]),
        ("Which is round?", ["a ball", "a box"]),
    ]
    items, expected_acc, expected_norm = [], [], []
    for number, (question, choices) in enumerate(questions):
        lls = [loglikelihood(model, tiny_tokenizer, f"Question: {question}\nAnswer:", " " + c) for c in choices]
        best = max(range(len(choices)), key=lls.__getitem__)
        best_norm = max(range(len(choices)), key=lambda i: lls[i] / len(choices[i]))
        # the first two labelled as the model prefers, the last two not: acc must come out 0.5
        label = best if number < 2 else (best + 1) % len(choices)
        items.append({"id": f"q{number}", "context": question, "choices": choices, "label": label})
        expected_acc.append(label == best)
        expected_norm.append(label == best_norm)
    items.append({"id": "beyond-the-limit", "context": "Unused?", "choices": ["a", "b"], "label": 0})
    write_items(tmp_path, "arc_easy", items)
    scores = evaluate_zeroshot(model, tiny_tokenizer, ["arc_easy"], tmp_path, limit=4, batch_size=3)["arc_easy"]
    assert scores["items"] == 4
    assert scores["acc"] == pytest.approx(sum(expected_acc) / 4) == 0.5
    assert scores["acc_norm"] == pytest.approx(sum(expected_norm) / 4)
    assert not model.training
    assert caplog.records[-1].getMessage().startswith("zero-shot: request 11/11, ")  # one per choice of the 4 items


# (d) bad input fails before any model work ---------------------------------------------------------

@pytest.fixture
def no_forward_pass(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before the bad input was reported")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)


GOOD = {"id": "p0", "context": "Open a jar.", "choices": ["Twist the lid.", "Eat the lid."], "label": 0}


def test_unknown_task(no_forward_pass, tiny_tokenizer, tmp_path):
    from callbacks.zeroshot import ZeroShotEvaluation

    with pytest.raises(InputError, match=r"task 'piqaa' is neither one of lm-eval 0.4.*'s \d+ tasks, groups and tags nor a local task") as refused:
        evaluate_zeroshot(tiny_llama(), tiny_tokenizer, ["arc_easy", "piqaa"], tmp_path, limit=2, batch_size=2)
    assert refused.value.key == "tasks" and refused.value.hint.startswith("did you mean 'piqa', ")
    with pytest.raises(InputError, match=r"ZeroShotEvaluation.tasks: task 'arc' is neither"):
        ZeroShotEvaluation(["arc"], str(tmp_path))
    with pytest.raises(InputError, match="must be a non-empty list"):
        ZeroShotEvaluation([], str(tmp_path))
    with pytest.raises(InputError, match="piqa listed more than once"):
        ZeroShotEvaluation(["piqa", "piqa"], str(tmp_path))


@pytest.fixture
def no_model_load(monkeypatch):
    import hywia_lightning.models.causal_lm

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(hywia_lightning.models.causal_lm, "load_causal_lm", forbidden)


def test_an_unknown_task_is_refused_before_the_model_is_loaded(no_model_load, tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path / "run")
    job["zeroshot"] = {"tasks": ["piqa", "hellaswagg"], "data_dir": str(tmp_path)}
    with pytest.raises(InputError, match=r"task 'hellaswagg' is neither") as refused:
        run_fit(job, tmp_path / "run")
    assert refused.value.key == "zeroshot.init_args.tasks" and "did you mean 'hellaswag', " in refused.value.hint


def test_missing_task_data(no_forward_pass, tiny_tokenizer, tmp_path):
    write_items(tmp_path, "piqa", [GOOD])
    with pytest.raises(InputError) as refused:
        evaluate_zeroshot(tiny_llama(), tiny_tokenizer, ["piqa", "arc_easy"], tmp_path, limit=2, batch_size=2,
                          datasets_dir=tmp_path / "datasets")
    message = str(refused.value)
    assert refused.value.key == "datasets_dir"
    assert "task 'arc_easy': lm-eval's dataset allenai/ai2_arc (ARC-Easy) could not be had" in message
    assert f"no file {tmp_path / 'arc_easy.jsonl'}" in message
    assert f"no folder {tmp_path / 'datasets' / 'allenai' / 'ai2_arc'}[/ARC-Easy]" in message
    assert "the datasets cache (the hub is off" in message
    assert "huggingface-cli download --repo-type dataset allenai/ai2_arc" in refused.value.hint
    assert "or put arc_easy.jsonl (normalized items) into data_dir" in refused.value.hint


@pytest.mark.parametrize("second_line,problem", [
    ('{"id": "p1", "context": "x", "choices": ["a", "b"], "label": 0', r"invalid JSON"),
    ('{"id": "p1", "context": "x", "choices": ["a", "b"]}', r"missing field 'label'"),
    ('{"id": "p1", "context": "x", "choices": ["a", "b"], "label": 2}', r"label 2 is out of range for 2 choices \(0..1\)"),
    ('{"id": "p1", "context": "x", "choices": ["a", "b"], "label": "1"}', r"field 'label' must be an integer"),
    ('{"id": "p1", "context": "x", "choices": ["a", "b", "c"], "label": 0}', r"3 choices; this task has exactly 2"),
])
def test_malformed_line_names_file_and_line(second_line, problem, no_forward_pass, tiny_tokenizer, tmp_path):
    (tmp_path / "piqa.jsonl").write_text(json.dumps(GOOD) + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'piqa.jsonl'}:2: {problem}"):
        evaluate_zeroshot(tiny_llama(), tiny_tokenizer, ["piqa"], tmp_path, limit=2, batch_size=2)


def test_winogrande_needs_a_blank(tmp_path):
    write_items(tmp_path, "winogrande", [{"id": "w", "context": "No blank here.", "choices": ["a", "b"], "label": 0}])
    with pytest.raises(ValueError, match=r"winogrande.jsonl:1: field 'context' has no blank '_'"):
        read_items(tmp_path, "winogrande")


# (e) lm-eval's own tasks by name: the same numbers as the local path ------------------------------

def piqa_datasets_folder(folder: Path, items: list[dict]) -> Path:
    """A datasets folder holding PIQA where lm-eval's piqa (``dataset_path: baber/piqa``) finds it:
    normalized items turned back into PIQA's raw fields, in the train and validation splits its
    config names."""
    piqa = folder / "baber" / "piqa"
    piqa.mkdir(parents=True)
    rows = "".join(json.dumps({"goal": it["context"], "sol1": it["choices"][0], "sol2": it["choices"][1],
                               "label": it["label"]}) + "\n" for it in items)
    for split in ("train", "validation"):
        (piqa / f"{split}.jsonl").write_text(rows)
    return folder


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """The datasets library's cache in the test's folder; and the hub is off."""
    import datasets

    assert datasets.config.HF_HUB_OFFLINE, "the tests must not reach the hub (HF_DATASETS_OFFLINE=1)"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return tmp_path / "datasets-cache"


def test_registry_piqa_from_a_datasets_folder_scores_as_the_local_path(tiny_tokenizer, tmp_path, shared_zeroshot, datasets_cache):
    from lm_eval.models.huggingface import HFLM

    items = raw_items("piqa", 20)
    local = write_items(tmp_path / "local", "piqa", items)
    folder = piqa_datasets_folder(tmp_path / "datasets", items)
    by_registry, by_file = prepare_tasks(["piqa"], datasets_dir=folder), prepare_tasks(["piqa"], data_dir=local)
    assert by_registry[0].source == f"lm-eval's piqa: baber/piqa from {folder / 'baber' / 'piqa'}"
    assert by_file[0].source == f"local file {local / 'piqa.jsonl'}"
    registry_task, local_task = by_registry[0].objects[0], by_file[0].objects[0]
    assert rendered(registry_task, limit=20) == rendered(local_task, limit=20)  # the same requests, in order

    model = tiny_llama()
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=8)
    per_item = [lm.loglikelihood(task.instances, disable_tqdm=True) for task in (registry_task, local_task)]
    assert len(per_item[0]) == 40 and per_item[0] == per_item[1]

    results = [run_zeroshot(model, tiny_tokenizer, prepared, batch_size=8) for prepared in (by_registry, by_file)]
    assert results[0]["results"]["piqa"] == results[1]["results"]["piqa"]
    scores = zeroshot_scores(results[0], by_registry)["piqa"]
    assert scores["items"] == 20 and set(scores) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items", "source"}
    assert 0 < scores["acc_stderr"] < 0.2


def test_a_registry_folder_without_a_split_the_task_reads(tmp_path, datasets_cache):
    folder = piqa_datasets_folder(tmp_path / "datasets", [GOOD])
    (folder / "baber" / "piqa" / "train.jsonl").unlink()
    with pytest.raises(InputError, match=r"task 'piqa': lm-eval's dataset baber/piqa in .*baber/piqa: no split 'train' \(its splits: validation\)"):
        prepare_tasks(["piqa"], datasets_dir=folder)


# (f) the callback in a run -------------------------------------------------------------------------

def zeroshot_job(model_dir: Path, root: Path, data_dir: Path, limit: int | None = 2, datasets_dir: Path | None = None) -> dict:
    job = prune_job(model_dir, root)
    job["zeroshot"] = {"tasks": ["piqa", "arc_easy"], "data_dir": str(data_dir), "limit": limit, "batch_size": 4,
                       "datasets_dir": str(datasets_dir) if datasets_dir else None}
    return job


def test_callback_records_zeroshot_in_the_report(tiny_model_dir, tmp_path, datasets_cache):
    data = write_items(tmp_path / "data", "arc_easy", [HAND_WRITTEN["arc_easy"][0], HAND_WRITTEN["arc_challenge"][0]])
    piqa = piqa_datasets_folder(tmp_path / "datasets", [GOOD, {**GOOD, "id": "p1", "label": 1}, {**GOOD, "id": "p2"}])
    run_fit(zeroshot_job(tiny_model_dir, tmp_path / "run", data, datasets_dir=piqa), tmp_path / "run")
    export = tmp_path / "run" / "export"
    report = json.loads((export / "report.json").read_text())
    zeroshot = report["zeroshot"]
    assert zeroshot["data_dir"] == str(data) and zeroshot["limit"] == 2
    for task in ("piqa", "arc_easy"):
        assert zeroshot[task]["items"] == 2
        assert 0.0 <= zeroshot[task]["acc"] <= 1.0 and 0.0 <= zeroshot[task]["acc_norm"] <= 1.0
        assert zeroshot[task]["acc_stderr"] > 0
    assert zeroshot["piqa"]["acc"] == 0.5  # one of the two identical questions is labelled each way
    assert zeroshot["piqa"]["source"].startswith("lm-eval's piqa: baber/piqa from ")  # no piqa.jsonl in data_dir
    assert zeroshot["arc_easy"]["source"] == f"local file {data / 'arc_easy.jsonl'}"
    assert "zeroshot" in report["seconds"] and "pruning" in report

    # lm-eval's own results, of the pruned model, next to the report and part of the export
    lm_eval = json.loads((export / zeroshot["lm_eval_results"]).read_text())
    assert lm_eval["results"]["piqa"]["acc,none"] == zeroshot["piqa"]["acc"]
    assert lm_eval["n-samples"]["arc_easy"]["effective"] == 2 and "samples" not in lm_eval
    assert "zeroshot_lm_eval.json" in json.loads((export / ".hywia_export").read_text())["files"]


def test_the_cli_checks_the_data_before_loading_the_model(no_model_load, tiny_model_dir, tmp_path):
    data = write_items(tmp_path / "data", "piqa", [GOOD])
    with pytest.raises(InputError, match=r"task 'arc_easy': lm-eval's dataset .* no file .*arc_easy.jsonl") as refused:
        run_fit(zeroshot_job(tiny_model_dir, tmp_path / "run", data), tmp_path / "run")
    assert refused.value.key == "zeroshot.init_args.datasets_dir"
    (tmp_path / "data" / "piqa.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"id": "p1"}\n')
    with pytest.raises(ValueError, match=r"piqa.jsonl:2: missing field 'context'") as malformed:
        run_fit(zeroshot_job(tiny_model_dir, tmp_path / "run", data), tmp_path / "run")
    assert marked(malformed.value) is not None  # the CLI prints it as one paragraph


def test_the_callback_checks_its_data_before_pruning(no_forward_pass, tmp_path):
    from callbacks.zeroshot import ZeroShotEvaluation

    callback = ZeroShotEvaluation(["piqa", "arc_easy"], str(write_items(tmp_path / "data", "piqa", [GOOD])))
    callback.config_key = "zeroshot.init_args"
    with pytest.raises(InputError, match=r"task 'arc_easy': lm-eval's dataset .* no file .*arc_easy.jsonl") as refused:
        callback.check(None, None)
    assert refused.value.key == "ZeroShotEvaluation.datasets_dir (zeroshot.init_args.datasets_dir)"


def test_report_rows_for_lm_evals_metrics():
    from hywia_lightning.report.markdown import render_markdown

    zeroshot = {"limit": None, "lm_eval_results": "zeroshot_lm_eval.json",
                "mmlu": {"acc": 0.25, "acc_stderr": 0.01, "items": 14042, "source": "lm-eval's mmlu: ..."},
                "wikitext": {"word_perplexity": 40.5, "word_perplexity_stderr": None, "items": 62, "source": "..."},
                "gsm8k": {"exact_match/strict-match": 0.125, "exact_match_stderr/strict-match": 0.01, "items": 8, "source": "..."}}
    dense = {"mmlu": {"acc": 0.5}, "wikitext": {"word_perplexity": 20.0}}
    markdown = render_markdown({"seconds": {}, "zeroshot": zeroshot, "baseline": {"zeroshot": {"results": dense}}})
    assert "| mmlu acc % ↑ (n=14042) | 50.0 | 25.0 | -25.0 |" in markdown
    assert "| wikitext word_perplexity (n=62) | 20.00 | 40.50 | +20.5 |" in markdown
    assert "| gsm8k exact_match/strict-match % ↑ (n=8) | – | 12.5 | – |" in markdown
    assert "stderr" not in markdown
