"""The country→capital analysis of Lv et al. (2024), end to end: the user's entry point.

Every name of :mod:`factlens.recall` is here, with the relation defaulting to ``CAPITALS`` (225 zero-shot
prompts; ``shots`` adds demonstrations). For another relation, pass it (``capitals.dataset_for(model,
relation)``) or use :mod:`factlens.recall` directly.

Example:
    >>> import factlens
    >>> from factlens import capitals
    >>> model = factlens.tiny("gpt2")
    >>> ds = capitals.dataset_for(model)
    >>> len(ds)
    225
    >>> table = capitals.mitigation_table(model, shots=[0], folds=3, progress=False)
"""

from factlens.recall import *  # noqa: F403  (the same API; this module is its country→capital name)
from factlens.recall import __all__  # noqa: F401
