"""factlens: mechanistic interpretability of factual recall on TransformerLens 4.3.

Two papers as hook-based tools on ``TransformerBridge`` (GPT-2 small/medium/large, OPT-1.3B and tiny random
twins of them):

- Zucchet et al. 2025, *How do language models learn facts?*: synthetic biographies, a fast training loop,
  knowledge metrics, and attention-pattern patching from reference checkpoints into a fresh run
  (:mod:`factlens.bios`, its patching in :mod:`factlens.bios.patching`).
- Lv et al. 2024, *Interpreting key mechanisms of factual recall*: the country→capital analysis, MLP-output
  decomposition and the final-layer anti-overconfidence mitigations (:mod:`factlens.recall.relations`,
  :mod:`factlens.recall`, :mod:`factlens.capitals`).

Example:
    >>> import factlens
    >>> model = factlens.tiny("gpt2")
    >>> tokens = model.to_tokens("The capital of France is", prepend_bos=False)
    >>> with factlens.intervene(model, factlens.attend_to_self(model)) as run:
    ...     logits = model(tokens)
    >>> with factlens.mitigate(model):                  # Lv et al.'s fix (a): the last layer attends to itself
    ...     logits = model(tokens)
"""

import importlib

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

__version__ = "0.1.0"

# Everything that imports torch is imported on first attribute access (PEP 562), so that `import factlens` and
# `factlens --help` stay light: name -> (module, attribute or None for the module itself).
_LAZY = {
    **{name: ("factlens.hooks", name) for name in ("HookRecord", "Intervention", "hook")},
    **{name: ("factlens.edits", name) for name in ("add_vector", "attend_to_self", "edit_scores", "patch_pattern")},
    **{name: ("factlens.intervening", name) for name in ("intervene", "run_with_interventions")},
    **{name: ("factlens.models", name) for name in ("SUPPORTED", "bridge_from_hf", "build_hf", "full_size", "load",
                                                    "prepare", "resolve", "tiny")},
    "memory_usage": ("factlens.resources", "memory_usage"),
    "run_with_cache": ("factlens.cache", "run_with_cache"),
    "bios": ("factlens.bios", None),
    "capitals": ("factlens.capitals", None),
    "plot": ("factlens.plot", None),
    "recall": ("factlens.recall", None),
    "testbeds": ("factlens.testbeds", None),
    "mitigate": ("factlens.recall.mitigation", "mitigate"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'factlens' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

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
    "bios",
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
    "plot",
    "prepare",
    "recall",
    "resolve",
    "run_with_cache",
    "run_with_interventions",
    "testbeds",
    "tiny",
]
