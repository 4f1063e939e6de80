"""lm-evaluation-harness integration: the MC likelihood, the `llada_trm` model and the `gsm8k_local` task.

The estimator tests need only torch; the rest run lm-eval's own `simple_evaluate` on a tiny synthetic GSM8K
slice written to tmp_path, and are skipped when lm_eval (the `eval` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from llada_trm.data.gsm8k import GSM8KRecord, write_jsonl
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.errors import ConfigError
from llada_trm.evaluate.extraction import extract_flexible, extract_strict, is_correct
from llada_trm.extras.harness.likelihood import greedy_matches, masked_counts, mc_log_likelihood, random_masks
from llada_trm.extras.harness.tasks import DATA_ENV_VAR, resolve_data_path, tasks_dir

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm_eval is not installed (pip install 'llada-trm[eval]')",
)

# The embedded backbone's own task, so that it answers some problems right (scores are not all zero).
TASK = SyntheticTaskConfig(max_steps=2, max_number=12, max_result=100)
SAMPLING = {"gen_length": 64, "block_length": 32, "steps": 32}
N_DOCS = 8


# ------------------------------------------------------------------------------------- MC likelihood



def _evaluate_like_the_harness(harness_lm, records):
    """The package's own evaluation of `records` with the harness model's weights and sampler."""
    from llada_trm.diffusion.options import SamplingOptions
    from llada_trm.evaluate.evaluator import evaluate_model

    return evaluate_model(
        harness_lm.loaded.model,
        harness_lm.tokenizer,
        records,
        SamplingOptions(batch_size=N_DOCS, **SAMPLING),
        num_steps=harness_lm.loaded.num_steps,
        progress=False,
    )

def test_masked_counts_are_stratified_over_one_to_length():
    counts = masked_counts(5, 20, torch.Generator().manual_seed(3))
    assert sorted(counts.tolist()) == [k for k in range(1, 6) for _ in range(4)]  # each count n/L times


def test_random_masks_hide_exactly_the_drawn_counts():
    counts = torch.tensor([1, 3, 6])
    masks = random_masks(counts, 6, torch.Generator().manual_seed(0))
    assert masks.sum(dim=1).tolist() == [1, 3, 6]


def _constant_logits(vocab: int = 7, favourite: int = 4):
    """Same distribution at every position, whatever the input: every MC draw then gives L * CE exactly."""
    row = torch.linspace(-1.0, 1.0, vocab)
    row[favourite] = 3.0

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return row.expand(*ids.shape, vocab).clone()

    return logits_fn, torch.log_softmax(row, dim=0)


def test_mc_log_likelihood_weights_masked_ce_by_length_over_count():
    logits_fn, log_probs = _constant_logits()
    value = mc_log_likelihood(
        logits_fn,
        [0, 1],
        [4, 4, 4],
        mask_id=6,
        mc_num=10,
        mc_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert value == pytest.approx(3 * float(log_probs[4]), rel=1e-6)


def test_greedy_matches_reads_the_fully_masked_argmax():
    logits_fn, _ = _constant_logits()
    assert greedy_matches(logits_fn, [0], [4, 4], mask_id=6)
    assert not greedy_matches(logits_fn, [0], [4, 2], mask_id=6)


# ------------------------------------------------------------------------------------- task data


def test_data_path_comes_from_metadata_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=DATA_ENV_VAR):
        resolve_data_path(None)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_path(None) == tmp_path
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data_path(tmp_path / "missing")
    assert (tasks_dir() / "gsm8k_local.yaml").is_file()


# ------------------------------------------------------------------------------------- lm-eval


def _write_slice(directory, records) -> None:
    write_jsonl(records, directory / "test.jsonl")


def _evaluate(model, data_dir, *, chat: bool):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(  # without lm-eval's thousands of built-in tasks: indexing them takes seconds
        include_path=str(tasks_dir()), include_defaults=False, metadata={"gsm8k_data": str(data_dir)}
    )
    return simple_evaluate(
        model=model,
        tasks=["gsm8k_local"],
        task_manager=manager,
        apply_chat_template=chat,
        log_samples=True,
        limit=N_DOCS,
        bootstrap_iters=0,
    )


def _scores(out) -> tuple[float, float]:
    metrics = out["results"]["gsm8k_local"]
    return metrics["exact_match,strict-match"], metrics["exact_match,flexible-extract"]


@pytest.fixture(scope="module")
def harness_lm():
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm_eval is not installed (pip install 'llada-trm[eval]')")
    from llada_trm.extras.harness.model import LLaDATRMLM

    return LLaDATRMLM(
        checkpoint="embedded", device="cpu", batch_size=N_DOCS, mc_num=8, mc_batch_size=8, **SAMPLING
    )


@needs_lm_eval
def test_model_is_registered_under_its_name():
    from lm_eval.api.registry import get_model

    from llada_trm.extras.harness.model import MODEL_NAME, LLaDATRMLM

    assert get_model(MODEL_NAME) is LLaDATRMLM


@needs_lm_eval
def test_harness_scores_equal_the_project_evaluator(tmp_path, harness_lm):
    """Harness strict-match / flexible-extract on gsm8k_local == the project evaluator, sample by sample."""
    records = generate_problems(TASK, N_DOCS, "test")
    _write_slice(tmp_path, records)
    out = _evaluate(harness_lm, tmp_path, chat=True)
    samples = sorted(out["samples"]["gsm8k_local"], key=lambda s: (s["filter"], s["doc_id"]))
    strict = [s for s in samples if s["filter"] == "strict-match"]
    flexible = [s for s in samples if s["filter"] == "flexible-extract"]
    completions = [s["resps"][0][0] for s in strict]

    ours = _evaluate_like_the_harness(harness_lm, records)
    assert completions == [p["completion"] for p in ours.predictions]  # same prompts, same sampler
    assert [s["exact_match"] for s in strict] == [float(p["correct_strict"]) for p in ours.predictions]
    assert [s["exact_match"] for s in flexible] == [float(p["correct_flexible"]) for p in ours.predictions]
    assert _scores(out) == (ours.accuracy_strict, ours.accuracy_flexible)
    assert ours.accuracy_flexible > 0  # a meaningful comparison, not 0 == 0


# Completions that probe every normalisation rule the two scorers must share.
_CRAFTED = [
    ("#### 12", "#### 12"),
    ("#### 12.0", "#### 12"),  # lm-eval: 12.0 != 12
    ("It costs $1,750.", "#### 1,750"),
    ("#### 1,000.", "#### 1000"),
    ("#### 5.50", "#### 5.5"),
    ("first 7, then ...", "#### 7"),  # the last match is `...`, in both scorers
    ("#### -3\nso -3", "#### -3"),
    ("no number", "#### 4"),
]


@needs_lm_eval
def test_normalisation_agrees_with_lm_eval_on_crafted_completions(tmp_path):
    from lm_eval.api.model import LM

    questions = [f"Crafted question {i}?" for i in range(len(_CRAFTED))]
    records = [GSM8KRecord(q, ref) for q, (_, ref) in zip(questions, _CRAFTED, strict=True)]
    _write_slice(tmp_path, records)
    canned = {q: completion for q, (completion, _) in zip(questions, _CRAFTED, strict=True)}

    class Canned(LM):
        def generate_until(self, requests):
            return [canned[request.args[0]] for request in requests]

        def loglikelihood(self, requests):
            raise AssertionError("gsm8k_local only generates")

        loglikelihood_rolling = loglikelihood

    out = _evaluate(Canned(), tmp_path, chat=False)
    for sample in out["samples"]["gsm8k_local"]:
        completion, reference = _CRAFTED[sample["doc_id"]]
        flexible = sample["filter"] == "flexible-extract"
        assert sample["exact_match"] == float(is_correct(completion, reference, flexible=flexible)), sample
    strict = sum(is_correct(c, r) for c, r in _CRAFTED) / len(_CRAFTED)
    flexible = sum(is_correct(c, r, flexible=True) for c, r in _CRAFTED) / len(_CRAFTED)
    assert _scores(out) == pytest.approx((strict, flexible))
    assert extract_strict("#### 12.0") == "12.0" and extract_flexible("first 7, then ...") == ".."


@needs_lm_eval
def test_gen_kwargs_override_sampler_options_and_stop_strings_cut(harness_lm):
    from llada_trm.extras.harness.model import apply_stop_strings

    options, stops = harness_lm._request_options({"until": "Question:", "steps": 16, "top_p": 0.9})
    assert (options.steps, options.gen_length, stops) == (16, SAMPLING["gen_length"], ["Question:"])
    assert apply_stop_strings("#### 4\nQuestion: next\n\n", ["\n\n", "Question:"]) == "#### 4\n"
    with pytest.raises(ValueError, match="multiple"):
        harness_lm._request_options({"steps": 3})


@needs_lm_eval
def test_loglikelihood_is_a_reproducible_mc_estimate(harness_lm):
    from lm_eval.api.instance import Instance

    prompt = harness_lm.apply_chat_template([{"role": "user", "content": "Tom has 3 eggs. He finds 4 more."}])
    requests = [
        Instance("loglikelihood", {}, (prompt, "Tom has 3+4=<<3+4=7>>7 eggs now.\n#### 7"), 0),
        Instance("loglikelihood", {}, (prompt, " zebra zebra zebra"), 1),
    ]
    harness_lm._mc_generator.manual_seed(0)
    first = harness_lm.loglikelihood(requests, disable_tqdm=True)
    harness_lm._mc_generator.manual_seed(0)
    again = harness_lm.loglikelihood(requests, disable_tqdm=True)
    assert [r[0] for r in first] == [r[0] for r in again]
    assert all(math.isfinite(lp) and lp < 0 and isinstance(greedy, bool) for lp, greedy in first)
    assert first[0][0] > first[1][0]  # the model's own kind of answer is far likelier than noise


@needs_lm_eval
def test_cli_adds_the_task_directory(monkeypatch):
    import lm_eval.__main__

    from llada_trm.extras.harness import cli

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", ["llada-trm-lm-eval"])
    cli.main(["--model", "llada_trm", "--tasks", "gsm8k_local"])
    cli.main(["--tasks", "mine", "--include_path=DIR"])
    assert seen == [
        ["--model", "llada_trm", "--tasks", "gsm8k_local", "--include_path", str(tasks_dir())],
        ["--tasks", "mine", "--include_path=DIR"],  # the user's own path is left alone
    ]


@needs_lm_eval
def test_every_sampler_option_reaches_the_sampler(harness_lm, monkeypatch):
    import llada_trm.extras.harness.model as harness_model

    seen = {}
    real = harness_model.sample

    def spy(model, prompt, attention_mask, options, **kwargs):
        seen["options"] = options
        return real(model, prompt, attention_mask, options, **kwargs)

    monkeypatch.setattr(harness_model, "sample", spy)
    options, _ = harness_lm._request_options({"until": "Question:", "logits_eos_inf": True})
    harness_lm._sample([harness_lm.tok_encode("Tom has 3 apples.")], options)
    got = seen["options"]
    assert got.logits_eos_inf and not got.confidence_eos_eot_inf
    assert got.mask_id == harness_lm.loaded.model.mask_token_id and got.eos_id == harness_lm.ids.eos


@needs_lm_eval
def test_prompts_that_do_not_fit_are_skipped_alike_by_eval_and_the_harness(tmp_path, harness_lm):
    """One policy (`fit_prompts`): a prompt + gen_length beyond the positions is skipped, scored as
    wrong and counted, by `eval`'s evaluator and by the lm-eval backend alike (the backend used to cut it from
    the left, chat header included, and `eval` stopped at it)."""
    from llada_trm.evaluate.evaluator import POLICY

    records = generate_problems(TASK, 3, "test")
    too_long = GSM8KRecord("How many? " + "Tom has 3 apples and 4 pears. " * 60, "#### 7")
    records.insert(1, too_long)
    _write_slice(tmp_path, records)
    seen, skipped = harness_lm.prompts_seen, harness_lm.skipped_prompts  # the fixture is shared
    out = _evaluate(harness_lm, tmp_path, chat=True)
    strict = sorted(
        (s for s in out["samples"]["gsm8k_local"] if s["filter"] == "strict-match"), key=lambda s: s["doc_id"]
    )
    ours = _evaluate_like_the_harness(harness_lm, records)
    assert ours.summary["prompts"]["skipped"] == 1 and ours.summary["prompts"]["skipped_indices"] == [1]
    assert ours.summary["n"] == 4 and ours.predictions[1]["skipped"] and not ours.predictions[1]["completion"]
    assert [s["resps"][0][0] for s in strict] == [p["completion"] for p in ours.predictions]
    assert strict[1]["exact_match"] == 0.0
    counted = out["config"]["prompts"]
    assert (counted["policy"], counted["n"] - seen, counted["skipped"] - skipped) == (POLICY, 4, 1)
    assert ours.summary["prompts"]["policy"] == POLICY
