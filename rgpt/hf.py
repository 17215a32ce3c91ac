"""python -m rgpt.hf export checkpoint=PATH out=DIR: an rgpt checkpoint as a transformers Llama directory
(config.json, model.safetensors, generation_config.json and rgpt's tokenizer with its chat template) that
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`
load (rgpt/runtime/hf.py). Arguments are key=value, like the Hydra entry points'; bad input is one line."""

import sys

COMMANDS = {"export": ("checkpoint", "out")}  # each command's keys, all required
USAGE = "usage: python -m rgpt.hf export checkpoint=PATH out=DIR"


def parse(argv) -> tuple[str, dict]:
    from rgpt.settings import ConfigError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"{USAGE} (got {' '.join(argv) or 'nothing'})")
    command, keys, args = argv[0], COMMANDS[argv[0]], {}
    for item in argv[1:]:
        key, eq, value = item.partition("=")
        if not eq or key not in keys or not value:
            raise ConfigError(f"{command}: expected {' '.join(k + '=...' for k in keys)}, got {item!r}")
        args[key] = value
    missing = [k for k in keys if k not in args]
    if missing:
        raise ConfigError(f"{command}: missing {' '.join(k + '=...' for k in missing)} ({USAGE})")
    return command, args


def run(argv) -> str:
    from rgpt.inference.generate import DecodeConfig
    from rgpt.runtime.hf import export

    command, args = parse(argv)
    out = export(args["checkpoint"], args["out"], DecodeConfig())
    return f"exported → {out}"


def main(argv=None) -> None:
    from rgpt.cli import friendly

    print(friendly(run)(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
