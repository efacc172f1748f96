"""The embed job: decode, preprocess, run the model, write ``features`` (embedding + top-50 concepts).

Public surface: :func:`run_embed` (the driver the CLI calls), the model registry
(:func:`get_model`, :func:`register_model`, :data:`MODELS`), and the class names
(:func:`class_names`). The partition function is :func:`jobs.embed.partition.embed_partition`.

Spark workers import this package when they unpickle the partition function, and must not import
deltalake; so the driver (which does) is imported lazily, on first access to ``run_embed``.
"""

from jobs.embed.classes import class_names, imagenet_classes
from jobs.embed.models import MODELS, ModelSpec, efficientnet_lite, get_model, head_split, register_model

__all__ = ["run_embed", "select_pending", "MODELS", "ModelSpec", "get_model", "register_model",
           "efficientnet_lite", "head_split", "class_names", "imagenet_classes"]


def __getattr__(name: str):
    if name in ("run_embed", "select_pending"):
        from jobs.embed import driver
        return getattr(driver, name)
    raise AttributeError(f"module 'jobs.embed' has no attribute {name!r}")
