"""A shallower backbone cut from a deeper one: chosen blocks kept in order, embeddings, final norm, LM head
and tokenizer unchanged. Issue 26's depth-limited backbone starts here (a 2-layer model trained from scratch
on the arithmetic task learned neither the answer format nor the operand copies in 6000 steps: strict 0.000).

    python scripts/truncate_backbone.py embedded --layers 0,5 --out experiments/arith_backbone_init

Keeping the first and the last block keeps the input processing and the block whose output the final norm
and LM head were trained to read. The result is a backbone directory in the Hugging Face layout, ready for
`llada-trm pretrain`'s `model.init_from` (configs/arith/backbone.yaml). Writes into a new folder (refuses an
existing one) through a staging folder renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

BLOCK = re.compile(r"^(model\.transformer\.blocks\.)(\d+)(\..+)$")


def truncated_state(state: dict, layers: list[int]) -> dict:
    """The tensors of ``state`` with blocks ``layers`` renumbered 0..len-1 and every other block dropped."""
    new_index = {old: new for new, old in enumerate(layers)}
    out = {}
    for name, tensor in state.items():
        match = BLOCK.match(name)
        if match is None:
            out[name] = tensor
        elif int(match.group(2)) in new_index:
            out[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = tensor
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a backbone directory, or 'embedded' for the shipped one")
    parser.add_argument("--layers", required=True, help="the blocks to keep, comma separated, e.g. 0,5")
    parser.add_argument("--out", type=Path, required=True, help="a new directory")
    args = parser.parse_args(argv)
    if args.source == "embedded":
        from llada_trm.assets import embedded_backbone_dir

        source = Path(embedded_backbone_dir())
    else:
        source = Path(args.source)
    config = json.loads((source / "config.json").read_text())
    layers = [int(x) for x in args.layers.split(",")]
    if not layers or sorted(set(layers)) != layers or layers[-1] >= config["n_layers"] or layers[0] < 0:
        wanted = f"increasing block indices below {config['n_layers']}"
        print(f"--layers: {wanted}, got {args.layers}", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"--out: {args.out} exists; choose a new directory", file=sys.stderr)
        return 2
    staging = args.out.with_name(args.out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)  # a staging folder is only ever this script's own, left by an interrupted run
    staging.mkdir(parents=True)
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(file, staging / file.name)
    state = truncated_state(load_file(str(source / "model.safetensors")), layers)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config["n_layers"] = len(layers)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "README.md").write_text(
        f"Blocks {layers} of {source.name} ({config['d_model']} wide), renumbered 0..{len(layers) - 1}; "
        f"made by `python scripts/truncate_backbone.py {args.source} --layers {args.layers} "
        f"--out {args.out}`.\n"
    )
    staging.rename(args.out)
    print(f"wrote {args.out}: blocks {layers} of {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
