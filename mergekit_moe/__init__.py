"""mergekit-moe: train per-task LoRA experts, compose them into a Med-MoE-LoRA checkpoint, share them.

The package is layered (lower layers never import upper ones):

    errors, atomic, hashing, progress, arch          (no torch)
    base, tiny, bundle, registry, data               (models and files)
    train, moe/*, checkpoint, recipe, compose, hub, evaluate
    cli/                                             (the only place that prints or exits)
"""

__version__ = "0.1.0"
