"""Every command's settings, handed to Hydra once from the dataclasses that define them.

`register("chat", ChatConfig)` stores the node `chat_schema`: every key of ChatConfig with its default.
rgpt/conf/chat.yaml lists it first in its defaults, so the YAML files only override (a preset, a stage, a
model) and never repeat a default. Also the resolvers the YAML files use: `${corpus:NAME}` (the built-in
corpus) and `${sweep_job:...}` (a sweep job's directory name).
"""

import dataclasses

from rgpt.settings import defaults


def register(config_name: str, schema) -> None:
    """Store `schema` (a settings dataclass, or the nested dict of its keys and defaults) as
    `<config_name>_schema`, and the resolvers; calling it again replaces the node."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from rgpt.data import CORPUS_DIR

    if not OmegaConf.has_resolver("corpus"):
        OmegaConf.register_new_resolver("corpus", lambda name: str(CORPUS_DIR / name))
    if not OmegaConf.has_resolver("sweep_job"):
        from rgpt.cli.overrides import sweep_job_name

        OmegaConf.register_new_resolver("sweep_job", sweep_job_name)
    node = defaults(schema) if dataclasses.is_dataclass(schema) else schema
    ConfigStore.instance().store(name=f"{config_name}_schema", node=node)
