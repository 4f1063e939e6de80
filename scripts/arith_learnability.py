"""Can a backbone learn the arithmetic task's line results at all? Issue 26's diagnostic.

The depth-limited arithmetic backbone (experiments/arith_backbone4) writes the task's format but computes
almost no result right, even 1-digit sums. Two measurements separate "the model cannot" from "the
pretraining objective does not teach it":

  probe BACKBONE
      teacher-forced 1-digit addition: the question "What is a + b?" and the answer's line up to `=` are
      given, the result and everything after it masked; the share of the 200 questions whose result digits
      the backbone's argmax gets right.
  train BACKBONE --data fresh|generated [--operations +-] [--max-chain 2] [--steps 600]
      fine-tunes a copy of BACKBONE (in memory) with the result of one answer line and everything after it
      masked (the prompt and the answer before that line's result kept), and reports the teacher-forced
      exactness of the masked result on 256 rows of a second draw every 200 steps (fresh: new problems;
      generated: other rows of the same records). `fresh` draws new problems every batch (operands of 1-3
      digits, addition, one line); `generated` draws from the task's own training records
      (data.arithmetic, 200,000 distinct problems).

    PYTHONPATH=src .venv/bin/python scripts/arith_learnability.py probe experiments/arith_backbone4
    PYTHONPATH=src .venv/bin/python scripts/arith_learnability.py train experiments/arith_backbone4 \
        --data fresh
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from llada_trm.data.arithmetic import ArithmeticTaskConfig, generate_task_records
from llada_trm.data.collate import encode_answer, encode_prompt
from llada_trm.data.tokenizer import eos_token_id, load_tokenizer, mask_token_id
from llada_trm.model.llada import LLaDAModel

SEQUENCE = 128  # the task's max_length (configs/arith/backbone4.yaml)


def _line(a: int, op: str, b: int) -> tuple[str, str]:
    c = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a}{op}{b}=<<{a}{op}{b}={c}>>{c}\n#### {c}"


class Rows:
    """Token rows with one line's result and everything after it masked, and where that result starts."""

    def __init__(self, tokenizer, data: str, operations: str, max_chain: int, seed: int) -> None:
        self.tokenizer, self.data, self.rng = tokenizer, data, random.Random(seed)
        self.mask, self.eos = mask_token_id(tokenizer), eos_token_id(tokenizer)
        self.records = []
        if data == "generated":
            task = ArithmeticTaskConfig(min_digits=1, max_digits=3, operations=list(operations), min_chain=1,
                                        max_chain=max_chain)  # fmt: skip
            self.records = generate_task_records(task, 200_000, split="train")

    def _example(self) -> tuple[list[int], int]:
        if self.data == "fresh":
            a, b = (self.rng.randint(0, 10 ** self.rng.randint(1, 3) - 1) for _ in range(2))
            question, answer = _line(a, "+", b)
        else:
            record = self.records[self.rng.randrange(len(self.records))]
            question, answer = record.question, record.answer
        prompt = encode_prompt(self.tokenizer, question)
        ids = prompt + encode_answer(self.tokenizer, answer)
        pieces = self.tokenizer.convert_ids_to_tokens(ids)
        equals = [i for i in range(len(prompt), len(ids)) if pieces[i] == "="]  # "=<<" is a token of its own
        return ids, self.rng.choice(equals) + 1

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        inputs, targets, masked, starts = [], [], [], []
        for _ in range(size):
            ids, start = self._example()
            ids = ids + [self.eos] * (SEQUENCE - len(ids))
            inputs.append(ids[:start] + [self.mask] * (SEQUENCE - start))
            targets.append(ids)
            masked.append([i >= start for i in range(SEQUENCE)])
            starts.append(start)
        return torch.tensor(inputs), torch.tensor(targets), torch.tensor(masked), starts


def result_exact(model: LLaDAModel, tokenizer, rows: Rows, n: int = 256) -> float:
    """Share of `n` rows whose masked result digits (up to the first non-digit) the argmax gets right."""
    inputs, targets, _, starts = rows.batch(n)
    with torch.no_grad():
        predicted = model(inputs).logits.argmax(-1)
    right = 0
    for row, start in enumerate(starts):
        end = start
        while end < SEQUENCE and tokenizer.convert_ids_to_tokens(int(targets[row, end])).isdigit():
            end += 1
        right += bool((predicted[row, start:end] == targets[row, start:end]).all())
    return right / n


def probe(backbone: str) -> None:
    tokenizer, model = load_tokenizer(backbone), LLaDAModel.from_pretrained(backbone).float().eval()
    rng, mask, right = random.Random(0), mask_token_id(tokenizer), 0
    for _ in range(200):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question, answer = _line(a, "+", b)
        prompt = encode_prompt(tokenizer, question)
        ids = prompt + encode_answer(tokenizer, answer)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        start = next(i for i in range(len(prompt), len(ids)) if pieces[i] == "=") + 1
        with torch.no_grad():
            logits = model(torch.tensor([ids[:start] + [mask] * (len(ids) - start)])).logits[0]
        digits = len(str(a + b))
        right += logits[start : start + digits].argmax(-1).tolist() == ids[start : start + digits]
    print(f"{backbone}: teacher-forced 1-digit addition {right}/200")


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    tokenizer, model = load_tokenizer(args.backbone), LLaDAModel.from_pretrained(args.backbone).float()
    rows = Rows(tokenizer, args.data, args.operations, args.max_chain, args.seed)
    evaluation_rows = Rows(tokenizer, args.data, args.operations, args.max_chain, args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        inputs, targets, masked, _ = rows.batch(args.batch_size)
        logits = model(inputs).logits
        # LLaDA's SFT normalisation (summed over masked tokens, over an answer length), clipping at 1.
        summed = F.cross_entropy(logits[masked], targets[masked], reduction="sum")
        loss = summed / (SEQUENCE - 30) / len(inputs)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0:
            model.eval()
            exact = result_exact(model, tokenizer, evaluation_rows)
            model.train()
            print(f"{args.data} step {step}: loss {loss.item():.3f}, result exact {exact:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("backbone")
    t = sub.add_parser("train")
    t.add_argument("backbone")
    t.add_argument("--data", choices=("fresh", "generated"), default="fresh")
    t.add_argument("--operations", default="+", help="generated: the task's operations, e.g. +-")
    t.add_argument("--max-chain", type=int, default=1, help="generated: lines per problem, at most")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    probe(args.backbone) if args.command == "probe" else train(args)


if __name__ == "__main__":
    main()
