"""The command line's overrides, read before Hydra runs: unknown keys and group options as one line with
a suggestion, and the directory name of a sweep job (the `${sweep_job:...}` resolver of rgpt/conf/config.yaml)."""

import difflib
import sys
from pathlib import Path

from rgpt.settings import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # inside the package, so a wheel carries it


def _parse(argv: list[str]):
    """Hydra's parsed overrides of a command line (flags such as -m skipped), or None if it does not parse:
    Hydra then reports the syntax error itself."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        return OverridesParser.create().parse_overrides(args.overrides)
    except (Exception, SystemExit):
        return None


def _group_choice(o) -> str | None:
    """`stage=sft`, `model=small,base` or `+preset=quick`: checked against the files of conf/<group>/, and
    returned as the override that composes the config (a sweep's first option); None for a plain key."""
    name = o.key_or_group
    if not (CONF_DIR / name).is_dir() or "/" in name:
        return None
    options = sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_string()]
    bad = [v for v in values if v not in options]
    if bad:
        raise ConfigError(f"{name}={bad[0]!r} is not one of {', '.join(options)}")
    return f"{'+' if o.is_add() else ''}{name}={values[0]}"


def _composed(config_name: str, groups: list[str]) -> dict:
    """The config with these group choices, unresolved, as nested dicts (Hydra's own section dropped)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name, overrides=groups), resolve=False)
    finally:
        GlobalHydra.instance().clear()
    cfg.pop("hydra", None)
    return cfg


def _keys(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner ones too: train, train.lr, ..."""
    out = []
    for k, v in node.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _has_key(node, key: str) -> bool:
    for part in key.split("."):
        if isinstance(node, list):
            return True  # data.files.0=...: an index into a list, which Hydra checks
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _suggestion(cfg: dict, key: str) -> str | None:
    """The known key closest to a misspelt one: among its siblings when its group exists (train.lrr ->
    train.lr), else among all keys (thread -> threads, trian.lr -> train.lr)."""
    parent, _, last = key.rpartition(".")
    if parent and _has_key(cfg, parent):
        siblings = [k.rpartition(".")[2] for k in _keys(cfg) if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
        return f"{parent}.{close[0]}" if close else None
    close = difflib.get_close_matches(key, _keys(cfg), n=1, cutoff=0.6)
    return close[0] if close else None


ENTRY = {"config": "train"}  # the command of each config


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Command-line overrides naming a key or group option the config lacks: a ConfigError of one line.

    Hydra would print its struct error and suggest adding the key with `+`, which rgpt's settings would
    refuse anyway. `+key=value`, `~key` and Hydra's own keys are left to Hydra and the settings' checks.
    """
    overrides = _parse(argv) or []
    groups, keys = [], []
    for o in overrides:
        if o.key_or_group.startswith("hydra") or o.is_delete() or o.package:
            continue
        group = _group_choice(o)
        if group is not None:
            groups.append(group)
        elif not o.is_add():
            keys.append(o.key_or_group)
    if not keys:
        return
    cfg = _composed(config_name, groups)
    for key in keys:
        if not _has_key(cfg, key):
            close = _suggestion(cfg, key)
            hint = (
                f"did you mean '{close}'?"
                if close
                else f"see `python -m rgpt.{ENTRY.get(config_name, config_name)} --cfg job` for every key"
            )
            raise ConfigError(f"unknown key '{key}' ({hint})")


def sweep_job_name(job_overrides, argv: list[str] | None = None) -> str:
    """A sweep job's directory name: its values of the keys the command line sweeps, e.g.
    `train.lr=0.001,model=small` for `-m model=small,base train.lr=1e-3,2e-3 train.max_epochs=3`.

    Keys given one value are left out, so the SFT sweep `-m stage=sft resume=true train.lr=1e-3,2e-3`
    names its jobs as the pretraining sweep `-m train.lr=1e-3,2e-3` did, and finds their models.
    """
    swept = {
        o.key_or_group for o in _parse(sys.argv[1:] if argv is None else argv) or [] if o.is_sweep_override()
    }
    job = _parse(list(job_overrides)) or []
    name = ",".join(f"{o.key_or_group}={o.get_value_string()}" for o in job if o.key_or_group in swept)
    return name.replace("/", "_")  # a value that is a path stays one directory
