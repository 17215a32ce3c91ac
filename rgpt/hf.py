"""rgpt ⇄ transformers (rgpt/runtime/hf.py); arguments are key=value, like the Hydra entry points'.

python -m rgpt.hf export checkpoint=PATH out=DIR
    a model=llama checkpoint as a transformers Llama directory (config.json, model.safetensors,
    generation_config.json, its tokenizer and chat template) that AutoModelForCausalLM and AutoTokenizer load
python -m rgpt.hf import src=DIR out=PATH [block_size=N] [pad= unk= bos= eos= user= assistant=]
    a local transformers Llama directory (safetensors, tokenizer.json) as an rgpt checkpoint; the optional keys
    name the tokens that play rgpt's six special roles where tokenizer_config.json does not say
Bad input is one line on stderr and exit status 1, with nothing written."""

import sys

ROLES = ("pad", "unk", "bos", "eos", "user", "assistant")
COMMANDS = {  # each command's required keys, then its optional ones
    "export": (("checkpoint", "out"), ()),
    "import": (("src", "out"), ("block_size", *ROLES)),
}
USAGE = "usage: python -m rgpt.hf export checkpoint=PATH out=DIR | import src=DIR out=PATH [block_size=N]"


def parse(argv) -> tuple[str, dict]:
    from rgpt.settings import ConfigError

    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"{USAGE} (got {' '.join(argv) or 'nothing'})")
    command, (required, optional), args = argv[0], COMMANDS[argv[0]], {}
    for item in argv[1:]:
        key, eq, value = item.partition("=")
        if not eq or key not in required + optional or not value:
            keys = " ".join(k + "=..." for k in required + optional)
            raise ConfigError(f"{command}: expected {keys}, got {item!r}")
        args[key] = value
    missing = [k for k in required if k not in args]
    if missing:
        raise ConfigError(f"{command}: missing {' '.join(k + '=...' for k in missing)} ({USAGE})")
    if "block_size" in args:
        if not args["block_size"].isdigit() or int(args["block_size"]) < 1:
            raise ConfigError(f"import: block_size={args['block_size']} must be a positive integer")
        args["block_size"] = int(args["block_size"])
    return command, args


def run(argv) -> str:
    from rgpt.inference.generate import DecodeConfig
    from rgpt.runtime import hf

    command, args = parse(argv)
    if command == "export":
        return f"exported → {hf.export(args['checkpoint'], args['out'], DecodeConfig())}"
    roles = {k: args[k] for k in ROLES if k in args}
    return f"imported → {hf.import_(args['src'], args['out'], args.get('block_size'), roles)}"


def main(argv=None) -> None:
    from rgpt.cli import friendly

    print(friendly(run)(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
