"""The frame itself: imports point one way, the loop knows no stage, and each setting is defined once."""

import ast
import dataclasses
from pathlib import Path

import pytest

import rgpt
from rgpt.settings import defaults
from rgpt.stages import STAGES
from rgpt.training.settings import RunConfig

ROOT = Path(rgpt.__file__).resolve().parent
ENTRY_POINTS = {"train", "chat", "eval", "serve", "inspect", "lora", "hf"}  # python -m rgpt.<name>
# what each layer may import (besides itself); the entry points may import anything
MAY_IMPORT = {
    "settings": set(),
    "nn": {"settings"},
    "data": {"settings", "nn"},
    "runtime": {"settings", "nn", "data"},
    "inference": {"settings", "nn", "data", "runtime"},
    "viz": {"settings", "nn", "data", "runtime", "inference"},
    "training": {"settings", "nn", "data", "runtime", "inference", "viz"},
    "stages": {"settings", "nn", "data", "runtime", "inference", "viz", "training"},
    "cli": {"settings", "data", "runtime"},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path) -> set[str]:
    """The top-level names this module imports: rgpt.<layer> for rgpt's own, else the package's name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "rgpt" else [f"rgpt.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            out.add(f"rgpt.{parts[1]}" if parts[0] == "rgpt" and len(parts) > 1 else parts[0])
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py") if "corpus" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    layer = layer_of(path)
    if layer in ENTRY_POINTS or layer == "__init__":
        return
    assert layer in MAY_IMPORT, f"{path}: a module outside the known layers ({layer}); add it to MAY_IMPORT"
    ours = {name.split(".")[1] for name in imports(path) if name.startswith("rgpt.")}
    wrong = sorted(ours - MAY_IMPORT[layer] - {layer})
    assert not wrong, f"{path.relative_to(ROOT)} ({layer}) imports {wrong}: imports point one way"
    if layer != "cli":  # Hydra stops at the entry points
        assert not imports(path) & {"hydra", "omegaconf"}, f"{path}: only entry points see Hydra"


def test_the_loop_knows_no_stage_by_name():
    names = set(STAGES) | {stage.settings[0] for stage in STAGES.values() if stage.settings}
    for path in sorted((ROOT / "training").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
        ]
        found += [
            node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in names
        ]
        assert not found, f"{path.relative_to(ROOT)} names stages {found}: ask the stage instead"


def test_every_stage_is_a_complete_plug_in():
    """Each registered stage has a preset, a kind of data, and (when it tunes a model) a stage to start from."""
    from rgpt.cli import CONF_DIR
    from rgpt.data.dataset import KINDS

    presets = {p.stem for p in (CONF_DIR / "stage").glob("*.yaml")}
    assert presets == set(STAGES), f"presets {sorted(presets)} vs registry {sorted(STAGES)}"
    for name, stage in STAGES.items():
        assert stage.name == name and stage.data_kind in KINDS, name
        assert not stage.needs_model or stage.starts_from in STAGES.values(), name
        if stage.settings is not None:  # its own group, beside (never over) the run's keys
            key, kind = stage.settings
            assert dataclasses.is_dataclass(kind) and key not in defaults(RunConfig), name


def equal(yaml_value, default) -> bool:
    """Equal, reading PyYAML's strings like '5e-4' (YAML 1.1 has no exponent floats) as numbers."""
    if isinstance(yaml_value, str) and isinstance(default, float):
        try:
            return float(yaml_value) == default
        except ValueError:
            return False
    return yaml_value == default


def test_no_yaml_repeats_a_default():
    """The YAML presets override the dataclasses' defaults; a value equal to the default is a second copy."""
    import yaml

    from rgpt.cli import CONF_DIR
    from rgpt.training.settings import schema

    base = schema(STAGES)

    def repeats(node, default, prefix=""):
        out = []
        for key, value in (node or {}).items():
            if key in ("defaults", "hydra") or not isinstance(default, dict) or key not in default:
                continue
            if isinstance(value, dict):
                out += repeats(value, default[key], f"{prefix}{key}.")
            elif equal(value, default[key]):
                out.append(f"{prefix}{key}")
        return out

    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        if path.parent.name in ("hydra", "model"):
            continue  # Hydra's own; the model presets are checked in test_config
        node = yaml.safe_load(path.read_text(encoding="utf-8"))
        same = repeats(node, base)
        assert not same, f"{path.relative_to(CONF_DIR)} repeats the defaults of {same}"


def module_name(path: Path) -> str:
    return ".".join(("rgpt", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def test_no_import_cycle():
    """No module reaches itself through rgpt's imports, counting those inside functions: a cycle hidden by
    a late import is still two modules that cannot be understood one before the other."""
    names = {module_name(p): p for p in MODULES}
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("rgpt")
            ):
                deps |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rgpt")}
        graph[name] = {d for d in deps if d in names and d != name}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v) :] + [u, v]))
            elif v not in state:
                visit(v, stack + [u])
        state[u] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, f"import cycles: {cycles}"
