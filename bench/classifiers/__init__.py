"""Frozen classifiers by name: the registry, the wrapper that owns normalization, and the loaders.

Names: registered families (``resnet20`` ... ``resnet56``, ``resnet4b`` ...), ``robustbench:<Name>``
(RobustBench model zoo, offline when the file is present) and ``file:<arch>:<path>`` (a user's state
dict for one of the registered architectures).
"""

from bench.classifiers.base import (
    ARCHITECTURES,
    CLASSIFIERS,
    Classifier,
    ClassifierInfo,
    load_classifier,
    load_state_dict,
)

__all__ = [
    "ARCHITECTURES",
    "CLASSIFIERS",
    "Classifier",
    "ClassifierInfo",
    "load_classifier",
    "load_state_dict",
]
