"""omnisky: any-to-any token generative models for astronomy.

The top-level folders of the repository are this package's subpackages:
`omnisky.shards`, `omnisky.tokenizers`, `omnisky.fm`, `omnisky.train`,
`omnisky.generate` (see pyproject.toml).
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Running `python -m omnisky....` from a checkout puts the checkout on sys.path, where
# our `tokenizers/` folder would shadow Hugging Face's `tokenizers` (which transformers,
# and so accelerate's DeepSpeed path, imports). Drop that entry: omnisky itself is
# found through its installed package mapping, never through the bare checkout path.
_here = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _here]
