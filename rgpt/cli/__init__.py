"""What the entry points share, and only they import: one-line user errors and the Hydra main.

Hydra stops here. An entry point's `main(cfg)` receives Hydra's composed config and turns it once into its
settings dataclass (`settings(cls, cfg)`, through rgpt.settings.parse); the library below never sees omegaconf.
"""

import functools
import re
import sys

from rgpt.cli.overrides import CONF_DIR
from rgpt.settings import ConfigError, load


def user_errors():
    """Exceptions that are the user's to fix: reported as one line, never as a traceback."""
    from rgpt.data import CorpusError
    from rgpt.runtime.checkpoint import CheckpointError

    return (ConfigError, CorpusError, CheckpointError)


def friendly(main):
    """Decorate an entry point: user errors -> 'error: …' on stderr and exit 1; Ctrl-C -> exit 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def settings(cls, cfg, **parse_kwargs):
    """Hydra's composed config -> dataclass `cls`, checked: the one way an entry point reads its config."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve, e.g. a typo in ${...}
        raise ConfigError(str(e).splitlines()[0]) from None
    raw.pop("hydra", None)
    if hasattr(cls, "from_dict"):  # a config that needs more than its fields to check itself (RunConfig)
        return cls.from_dict(raw, **parse_kwargs)
    return load(cls, raw)


def hydra_main(config_name: str, schema):
    """hydra.main over rgpt/conf/<config_name>.yaml, composed over `schema` (the dataclass of every key and
    its default, registered as the node `<config_name>_schema`), with rgpt's resolvers and one-line errors."""
    import hydra

    from rgpt.cli.schema import register

    register(config_name, schema)

    def decorate(fn):
        task = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(
            friendly(fn)
        )

        @functools.wraps(fn)
        def entry():
            from rgpt.cli.overrides import check_overrides

            friendly(check_overrides)(config_name, sys.argv[1:])
            task()

        return entry

    return decorate


# ---- text on the command line -------------------------------------------------------------------------
_HYDRA_ESCAPES = {"'": "\\'", "${": "\\${", "": ""}


def hydra_quote(value: str) -> str:
    """`value` as a Hydra quoted string that parses back to exactly `value` (quotes, backslashes, ${)."""
    body = re.sub(r"(\\*)('|\$\{|$)", lambda m: m.group(1) * 2 + _HYDRA_ESCAPES[m.group(2)], value)
    return f"'{body}'"


def quote_text_overrides(args: list[str], keys) -> list[str]:
    """Quote the values of `key=value` overrides of `keys`, unless already quoted (or null)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        keep = value == "null" or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
        out.append(f"{key}={hydra_quote(value)}" if eq and key.lstrip("+") in keys and not keep else arg)
    return out
