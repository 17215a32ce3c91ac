"""python -m rgpt.lora merge CHECKPOINT [--out DIR]: a LoRA checkpoint's adapters merged into a plain
checkpoint that chat, eval and serve load (rgpt/runtime/adapters.py)."""

import argparse

import torch


def main(argv=None) -> None:
    from rgpt.cli import friendly
    from rgpt.runtime.adapters import merge_checkpoint

    parser = argparse.ArgumentParser(prog="python -m rgpt.lora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a LoRA checkpoint into a plain checkpoint")
    m.add_argument("checkpoint", help="a LoRA checkpoint, or its run directory (outputs/lora/default)")
    m.add_argument("--out", help="directory of the merged checkpoint (default: <run>/merged)")
    args = parser.parse_args(argv)
    with torch.no_grad():
        out = friendly(merge_checkpoint)(args.checkpoint, args.out)
    print(f"merged → {out}")


if __name__ == "__main__":
    main()
