"""The stages, each a plug-in of the one training loop (rgpt/training/loop.py): STAGES is the registry.

A new stage is one module here (a rgpt.training.stage.Stage subclass), one line below, one preset
rgpt/conf/stage/<name>.yaml, and its tests.
"""

from rgpt.stages.dpo import DPO
from rgpt.stages.grpo import GRPO
from rgpt.stages.lm import SFT, Pretrain
from rgpt.stages.lora import LoRA

STAGES = {stage.name: stage for stage in (Pretrain, SFT, DPO, LoRA, GRPO)}
