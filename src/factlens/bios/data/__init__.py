"""The synthetic-biography data of Zucchet et al. (2025): pools, templates, people, tokenizer, batches, samplers.

Pure data, no model: everything here is a deterministic function of its seeds, so a resumed run and every DDP
rank see the same biographies.

Example:
    >>> from factlens.bios.data.population import Population
    >>> len(Population.generate(64, seed=0))
    64
"""
