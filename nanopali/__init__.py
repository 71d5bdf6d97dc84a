"""nanopali: Google's PaliGemma built from scratch in PyTorch, one notebook at a time.

Every module of this package except `export.py` and `__main__.py` is generated from a
lesson in `notebooks/`: read the lesson, then the module it exports.

The public API (lesson 07):

    model, processor = nanopali.load("weights/paligemma-3b-pt-224")   # device, dtype optional
    answers = nanopali.generate(model, processor, images, prompts, max_new_tokens=20)
"""

__version__ = "0.1.0"
__all__ = ["load", "generate", "save"]


def __getattr__(name):
    # imported on first use, so that `import nanopali.export` works even while a lesson's code is broken
    if name in __all__:
        from . import paligemma

        return getattr(paligemma, name)
    raise AttributeError(f"module 'nanopali' has no attribute {name!r}")
