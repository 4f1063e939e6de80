"""`llada-trm pretrain`: a few steps on a tiny architecture produce a loadable HF-layout checkpoint."""

import json

import pytest
import torch
from tiny_assets import REPO

from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.errors import ConfigError
from llada_trm.extras.pretraining.config import load_pretrain_config
from llada_trm.extras.pretraining.run import pretrain
from llada_trm.model.llada import LLaDAModel


def test_tiny_pretrain_writes_a_loadable_checkpoint_with_model_card(tmp_path):
    out = tmp_path / "backbone"
    config = load_pretrain_config(
        None,
        [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.mlp_hidden_size=64",
            "data.n_train=60",
            "data.n_eval=4",
            "data.max_steps=1",
            "training.steps=3",
            "training.batch_size=4",
            "training.warmup_steps=1",
            "training.eval_every=3",
            "evaluation.n_problems=2",
            "evaluation.n_test=2",
            "evaluation.gen_length=32",
            "evaluation.block_length=32",
            "evaluation.steps=4",
            f"output.dir={out}",
        ],
    )
    command = "llada-trm pretrain --config configs/tiny_backbone.yaml"
    result = pretrain(config, progress=False, command=command)

    assert result.output_dir == out and result.steps == 3
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.masked_accuracy <= 1.0
    assert not (tmp_path / "backbone.partial").exists()
    model = LLaDAModel.from_pretrained(out, dtype=torch.float32)
    tokenizer = load_tokenizer(out)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.mask_token_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_problems"] == 2
    rows = (out / "training_metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and rows[-1].startswith("3,")
    validation = (out / "validation_metrics.csv").read_text().splitlines()
    assert "strict" in validation[0].split(",") and validation[-1].startswith("3,")
    card = (out / "README.md").read_text()
    assert command in card and "95% Wilson interval" in card


def test_pretrain_config_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"training\.stpes: unknown key; did you mean 'steps'"):
        load_pretrain_config(None, ["training.stpes=3"])


def test_shipped_config_validates():
    config = load_pretrain_config(REPO / "configs" / "tiny_backbone.yaml")
    assert config.output.dir == "experiments/tiny_backbone_v1"


def test_object_weights_mark_the_tasks_object_nouns_only():
    from llada_trm.assets import embedded_backbone_dir
    from llada_trm.data.synthetic import DEFAULT_ITEMS
    from llada_trm.extras.pretraining.run import object_token_ids, object_weights

    tokenizer = load_tokenizer(embedded_backbone_dir())
    object_ids = object_token_ids(tokenizer, DEFAULT_ITEMS)
    assert len(object_ids) == len(DEFAULT_ITEMS)  # one token per noun in the shipped tokenizer
    text = "Tom has 3+4=<<3+4=7>>7 eggs now."
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    weights = object_weights(ids, object_ids, 5.0)
    marked = [tokenizer.decode([int(t)]) for t in ids[0][weights[0] == 5.0]]
    assert marked == [" eggs"] and int((weights == 1.0).sum()) == ids.shape[1] - 1
    assert object_weights(ids, object_ids, 1.0) is None  # LLaDA's loss, untouched


def test_random_padding_draws_each_batch_length_between_its_longest_and_max_length():
    from llada_trm.assets import embedded_backbone_dir
    from llada_trm.data.collate import SFTDataset
    from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
    from llada_trm.extras.pretraining.run import pad_randomly

    tokenizer = load_tokenizer(embedded_backbone_dir())
    records = generate_problems(SyntheticTaskConfig(max_steps=2, max_number=12, max_result=100), 40)
    dataset = SFTDataset(tokenizer, records, max_length=160)
    plain = dataset.collate([dataset[i] for i in range(4)])
    longest = int(plain["attention_mask"].sum(1).max())
    assert plain["input_ids"].shape[1] == longest  # the loop's collation: the batch's longest example
    lengths = set()
    for seed in range(12):
        batch = pad_randomly(plain, 160, dataset.pad_id, torch.Generator().manual_seed(seed))
        ids, own = batch["input_ids"], batch["attention_mask"].bool()
        assert int(own.sum(1).max()) <= ids.shape[1] <= 160
        assert torch.equal(ids[:, :longest], plain["input_ids"])
        assert bool((ids[~own] == dataset.pad_id).all())  # the tail is EOS padding, trained on
        assert torch.equal(batch["answer_lengths"], ids.shape[1] - batch["prompt_lengths"])
        lengths.add(ids.shape[1])
    assert len(lengths) > 6  # drawn, not fixed
    same = pad_randomly(plain, 160, dataset.pad_id, torch.Generator().manual_seed(3))
    again = pad_randomly(plain, 160, dataset.pad_id, torch.Generator().manual_seed(3))
    assert torch.equal(same["input_ids"], again["input_ids"])  # deterministic for the generator


def test_convert_drops_the_optimiser_keys_pretraining_no_longer_sets():
    from llada_trm.convert import convert_config

    old = {"model": {"d_model": 32}, "training": {"steps": 5, "weight_decay": 0.1, "max_grad_norm": 1.0},
           "evaluation": {"n_problems": 2}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"training\.weight_decay: a retired setting"):
        load_pretrain_config(None, ["training.weight_decay=0.1"])
    converted = convert_config(old, "old.yaml")
    assert converted.dropped == ["training.max_grad_norm"]  # the one loop's clipping norm, unchanged
    assert len(converted.warnings) == 1 and "training.weight_decay=0.1 dropped" in converted.warnings[0]
    assert converted.data == {"model": {"d_model": 32}, "training": {"steps": 5},
                              "evaluation": {"n_problems": 2}}  # fmt: skip
    bare = convert_config({"training": {"steps": 3, "weight_decay": 0.1}})  # no evaluation section: still one
    assert bare.data == {"training": {"steps": 3}} and "pretraining runs the one" in bare.warnings[0]
