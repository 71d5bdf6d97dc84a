"""nanopali: Google's PaliGemma built from scratch in PyTorch, one notebook at a time.

Every module of this package except `export.py` and `__main__.py` is generated from a
lesson in `notebooks/`: read the lesson, then the module it exports. Import what you
need from its module, e.g. `from nanopali.patches import preprocess_image`.
"""

__version__ = "0.1.0"
