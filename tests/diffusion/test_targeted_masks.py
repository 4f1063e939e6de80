"""Phase-1 masks where the sampler errs (`diffusion.forward_process`), their loss weight."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from llada_trm.diffusion.forward_process import (
    HARD_MARGIN,
    MaskDistribution,
    TokenText,
    TrainingMasks,
    answer_targets,
    draw_noise,
    draw_training_masks,
    masked_diffusion_loss,
    probe_margins,
)

# The generated task's answer as the embedded tokenizer splits it (digits one token each).
GENERATED = [
    "Lily", " has", " ", "3", "*", "1", "0", "=<<", "3", "*", "1", "0", "=", "3", "0", ">>", "3", "0",
    " eggs", ".", "\n", "Sam", " has", " ", "3", "0", "/", "2", "=<<", "3", "0", "/", "2", "=", "1", "5",
    ">>", "1", "5", " eggs", ".", "\n", "####", " ", "1", "5", "<|eot_id|>", "<|endoftext|>",
]  # fmt: skip

# A real GSM8K solution, tokenised as a multi-digit tokenizer might: "48", "24", "72" are single tokens.
GSM8K = [
    "Natalia", " sold", " 48", "/", "2", " =", " <<", "48", "/", "2", "=", "24", ">>", "24", " clips", " in",
    " May", ".\n", "Natalia", " sold", " 48", "+", "24", " =", " <<", "48", "+", "24", "=", "72", ">>", "72",
    " clips", " altogether", ".\n", "####", " 72",
]  # fmt: skip


def test_answer_targets_on_the_generated_format():
    targets = answer_targets(GENERATED)
    # line 1: "30" inside the annotation (13, 14), its copy after ">>" (16, 17), its later copies in
    # line 2 (24, 25 in the text and 29, 30 in the annotation); line 2: "15" (34, 35), copy (37, 38),
    # and in "#### 15" (44, 45)
    assert [t.positions for t in targets] == [
        (13, 14, 16, 17, 24, 25, 29, 30),
        (34, 35, 37, 38, 44, 45),
        (42, 43, 44, 45),  # the final line: "####", " ", "1", "5" (not the closing special tokens)
    ]
    assert [t.start for t in targets] == [13, 34, 42]


def test_answer_targets_on_gsm8k_with_multi_digit_tokens():
    targets = answer_targets(GSM8K)
    # "24": its result token (11), the copy (13), the later "24" in line 2's text (22) and annotation (27)
    assert [t.positions for t in targets] == [(11, 13, 22, 27), (29, 31, 36), (35, 36)]
    assert [t.start for t in targets] == [11, 29, 35]


def test_a_number_inside_a_longer_one_is_not_a_copy():
    pieces = list("a <<2*5=10>>10 then 100 and 10.5 and 110 and 10.\n#### 10")
    (line, final) = answer_targets(pieces)
    text = "".join(pieces)
    copies = sorted({text.index("10 then"), text.index("10.\n"), text.rindex("10")})
    for start in copies:  # each whole "10" after the annotation is masked, digit by digit
        assert {start, start + 1} <= set(line.positions)
    assert text.index("100") not in line.positions  # "100", "10.5" and "110" hold other numbers
    assert text.index("10.5") not in line.positions
    assert text.index("110") + 1 not in line.positions


def _row(pieces: list[str], prompt: int = 3, pad: int = 4) -> tuple[torch.Tensor, TokenText, int]:
    """One row: `prompt` prompt tokens, the answer's pieces as ids, `pad` EOS; and the texts of those ids."""
    vocab = {piece: index + 10 for index, piece in enumerate(dict.fromkeys(pieces))}
    texts = {index: piece for piece, index in vocab.items()}
    ids = [1] * prompt + [vocab[p] for p in pieces] + [vocab.get("<|endoftext|>", 2)] * pad
    return torch.tensor([ids]), TokenText(lambda tokens: texts.get(tokens[0], "?")), len(pieces)


@pytest.mark.parametrize("example", [0, 1, 2, 3, 4, 5])
def test_answer_structure_masks_exactly_one_target_and_later_positions(example):
    ids, token_text, n = _row(GENERATED)
    prompt = 3
    noisy, masked, p_mask = draw_training_masks(
        ids, torch.tensor([prompt]), mask_id=0, distribution=MaskDistribution("answer_structure"), seed=7,
        examples=[example], draws=0, token_text=token_text, answer_ends=torch.tensor([prompt + n]),
    )
    assert not masked[0, :prompt].any()
    answer = masked[0, prompt:]
    chosen = [t for t in answer_targets(GENERATED) if answer[list(t.positions)].all()
              and not answer[: t.start].any()]  # fmt: skip
    assert chosen, "the masks hold no whole target with a clean prefix"
    target = chosen[0]
    extra = answer.clone()
    extra[list(target.positions)] = False
    assert not extra[: target.start + 1].any()  # nothing before the target's first result token
    assert torch.equal(noisy, torch.where(masked, torch.zeros_like(ids), ids))
    assert torch.equal(p_mask, torch.ones_like(p_mask))  # plain CE of the masked tokens (module docstring)
    again = draw_training_masks(
        ids, torch.tensor([prompt]), mask_id=0, distribution=MaskDistribution("answer_structure"), seed=7,
        examples=[example], draws=0, token_text=token_text, answer_ends=torch.tensor([prompt + n]),
    )
    assert torch.equal(again[1], masked)  # reproducible from (seed, example, draw)


def test_answer_structure_draws_differ_by_seed_and_cover_every_target():
    ids, token_text, n = _row(GENERATED)
    seen, draws = set(), []
    for example in range(40):
        _, masked, _ = draw_training_masks(
            ids, torch.tensor([3]), mask_id=0, distribution=MaskDistribution("answer_structure"), seed=0,
            examples=[example], draws=0, token_text=token_text, answer_ends=torch.tensor([3 + n]),
        )
        answer = masked[0, 3:]
        draws.append(answer)
        for index, target in enumerate(answer_targets(GENERATED)):
            if answer[list(target.positions)].all() and not answer[: target.start].any():
                seen.add(index)
    assert seen == {0, 1, 2}
    assert len({tuple(d.tolist()) for d in draws}) > 20


def test_forward_kind_and_full_mix_are_the_forward_process():
    ids = torch.randint(5, 50, (3, 20))
    prompts = torch.tensor([4, 6, 2])
    reference = draw_noise(ids, prompts, 0, seed=3, examples=[5, 6, 7], draws=2)
    for distribution in (MaskDistribution("forward"), MaskDistribution("answer_structure", forward_mix=1.0)):
        out = draw_training_masks(
            ids, prompts, 0, distribution=distribution, seed=3, examples=[5, 6, 7], draws=2,
            token_text=TokenText(lambda t: "x"),
        )
        for a, b in zip(out, reference, strict=True):
            assert torch.equal(a, b)


def test_a_row_without_structure_keeps_its_forward_draw():
    ids = torch.randint(5, 50, (1, 20))
    reference = draw_noise(ids, torch.tensor([4]), 0, seed=1, examples=[0], draws=0)
    out = draw_training_masks(
        ids, torch.tensor([4]), 0, distribution=MaskDistribution("answer_structure"), seed=1, examples=[0],
        draws=0, token_text=TokenText(lambda t: "word"),
    )
    assert torch.equal(out[1], reference[1]) and torch.equal(out[2], reference[2])


def test_backbone_errors_mask_the_hard_positions_and_nothing_before_the_first():
    ids = torch.randint(5, 50, (2, 16))
    margins = torch.full((2, 16), 10.0)
    margins[0, 9] = -1.0  # wrong
    margins[0, 12] = HARD_MARGIN - 0.5  # right but barely
    masks = [
        draw_training_masks(
            ids, torch.tensor([4, 4]), 0, distribution=MaskDistribution("backbone_errors"), seed=s,
            examples=[0, 1], draws=0, margins=margins,
        )
        for s in range(10)
    ]
    reference = draw_noise(ids, torch.tensor([4, 4]), 0, seed=0, examples=[0, 1], draws=0)
    for seed, (_, masked, p_mask) in enumerate(masks):
        assert masked[0, 9] and masked[0, 12]
        assert not masked[0, :9].any()
        assert torch.equal(p_mask[0], torch.ones(16))
        if seed == 0:  # row 1 has no hard position: its forward-process draw
            assert torch.equal(masked[1], reference[1][1])
    later = torch.stack([m[1][0, 10:] for m in masks]).float().mean()
    assert 0.0 < later < 1.0  # the later positions masked with probability u


def test_probe_margins_against_a_hand_computation():
    torch.manual_seed(0)
    ids = torch.tensor([[3, 4, 1, 2, 0]])
    table = torch.randn(8, 5)  # logits of every position depend on the noisy ids only through a lookup

    def logits_of(noisy: torch.Tensor) -> torch.Tensor:
        return table[noisy] + noisy.float().sum() * 0.01

    margins = probe_margins(logits_of, ids, torch.tensor([2]), mask_id=7)
    assert torch.isinf(margins[0, :2]).all()
    for position in range(2, 5):
        noisy = ids.clone()
        parity = (position - 2) % 2
        for p in range(2, 5):
            if (p - 2) % 2 == parity:
                noisy[0, p] = 7
        logits = logits_of(noisy)[0, position]
        right = logits[ids[0, position]]
        other = torch.cat([logits[: ids[0, position]], logits[ids[0, position] + 1 :]]).max()
        assert margins[0, position] == pytest.approx(float(right - other), abs=1e-6)


def test_training_masks_probe_each_example_once():
    calls = []

    def probe(ids: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[0])
        out = torch.full(ids.shape, 5.0)
        out[:, -1] = -3.0
        return out

    masks = TrainingMasks(MaskDistribution("backbone_errors"), 0, 0, probe=probe)
    batch = {"input_ids": torch.randint(5, 50, (2, 10)), "prompt_lengths": torch.tensor([3, 3])}
    _, masked, _ = masks.draw(batch, [4, 9], 0)
    assert masked[:, -1].all()
    masks.draw(batch, [4, 9], 1)
    masks.draw({k: v[:1] for k, v in batch.items()}, [11], 0)
    assert calls == [2, 1]  # examples 4 and 9 once, then only the new example 11


def test_the_loss_weight_of_targeted_masks_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9)
    target = torch.randint(0, 9, (2, 6))
    masked = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    answer_lengths = torch.tensor([4, 5])
    loss = masked_diffusion_loss(logits, target, masked, torch.ones(2, 6), answer_lengths)
    ce = F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1), reduction="none").reshape(2, 6)
    hand = ((ce[0, 2] + ce[0, 3] + ce[0, 5]) / 4 + ce[1, 1] / 5) / 2
    assert float(loss) == pytest.approx(float(hand), rel=1e-6)


def test_result_accuracy_counts_targets_right_in_every_masked_token():
    from types import SimpleNamespace

    from llada_trm.training.validation import result_accuracy

    pieces = GENERATED[:-2]  # the answer without its closing special tokens
    vocab = {piece: index + 10 for index, piece in enumerate(dict.fromkeys(pieces))}
    texts = {index: piece for piece, index in vocab.items()}
    ids = torch.tensor([[1, 1] + [vocab[p] for p in pieces]])
    vocab_size = max(texts) + 1

    class Oracle(torch.nn.Module):
        """Backbone right everywhere except the first "0" of "30"; the refiner right everywhere."""

        def features(self, noisy: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(noisy=noisy)

        def refine(self, features: SimpleNamespace, masked: torch.Tensor) -> SimpleNamespace:
            truth = ids.expand(masked.shape[0], -1)
            logits = F.one_hot(truth, vocab_size).float()
            base = logits.clone()
            base[:, 2 + 14] = F.one_hot(torch.tensor(vocab["5"]), vocab_size).float()  # "30" -> "35"
            return SimpleNamespace(logits=logits, base_logits=base)

    batch = {"input_ids": ids, "prompt_lengths": torch.tensor([2])}
    out = result_accuracy(Oracle(), [batch], TokenText(lambda t: texts.get(t[0], "?")), mask_id=0,
                          device=torch.device("cpu"), autocast=contextlib.nullcontext)  # fmt: skip
    # three targets: "30" (its result token 14 is wrong for the backbone), "15", "#### 15"
    assert out == {"result_accuracy": 1.0, "result_accuracy_base": pytest.approx(2 / 3)}
