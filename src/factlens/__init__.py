"""factlens: mechanistic interpretability of factual recall on TransformerLens 4.3.

Two papers as hook-based tools on ``TransformerBridge`` (GPT-2 small/medium/large, OPT-1.3B and tiny random
twins of them):

- Zucchet et al. 2025, *How do language models learn facts?*: synthetic biographies, a fast training loop,
  knowledge metrics, and attention-pattern patching from reference checkpoints into a fresh run
  (:mod:`factlens.bios`, :mod:`factlens.patching`).
- Lv et al. 2024, *Interpreting key mechanisms of factual recall*: the country→capital analysis, MLP-output
  decomposition and the final-layer anti-overconfidence mitigations (:mod:`factlens.relations`,
  :mod:`factlens.decompose`, :mod:`factlens.capitals`).

Example:
    >>> import factlens
    >>> model = factlens.tiny("gpt2")
    >>> tokens = model.to_tokens("The capital of France is", prepend_bos=False)
    >>> with factlens.intervene(model, factlens.attend_to_self(model)) as run:
    ...     logits = model(tokens)
    >>> with factlens.mitigate(model):                  # Lv et al.'s fix (a): the last layer attends to itself
    ...     logits = model(tokens)
"""

from factlens import capitals
from factlens.capitals.mitigate import mitigate
from factlens.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigError,
    EmptyDatasetError,
    FactlensError,
    HookDidNotFireError,
    InterventionNoEffectError,
    ModeError,
    ResourceError,
    ShapeError,
    TokenizationError,
    UnknownModelError,
)
from factlens.hooks import (
    HookRecord,
    Intervention,
    add_vector,
    attend_to_self,
    edit_scores,
    hook,
    intervene,
    patch_pattern,
    run_with_interventions,
)
from factlens.models import SUPPORTED, bridge_from_hf, build_hf, full_size, load, prepare, resolve, tiny
from factlens.resources import memory_usage, run_with_cache

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED",
    "ArchitectureMismatchError",
    "CheckpointError",
    "ConfigError",
    "EmptyDatasetError",
    "FactlensError",
    "HookDidNotFireError",
    "HookRecord",
    "Intervention",
    "InterventionNoEffectError",
    "ModeError",
    "ResourceError",
    "ShapeError",
    "TokenizationError",
    "UnknownModelError",
    "add_vector",
    "attend_to_self",
    "bridge_from_hf",
    "build_hf",
    "capitals",
    "edit_scores",
    "full_size",
    "hook",
    "intervene",
    "load",
    "memory_usage",
    "mitigate",
    "patch_pattern",
    "prepare",
    "resolve",
    "run_with_cache",
    "run_with_interventions",
    "tiny",
]
