"""``imagelake tag``: concept tags and learned tags (see :mod:`jobs.tag.driver`).

Names load on first use, so importing :mod:`jobs.tag.state` (the API does) pulls in neither
scikit-learn nor FAISS.
"""

from importlib import import_module

__all__ = ["run_tag", "train_model", "concept_tags", "TagEdit", "apply_edit", "parse_edit", "ModelStore",
           "TagModel", "current_tags", "user_labels"]

_WHERE = {"run_tag": "driver", "train_model": "driver", "concept_tags": "concepts", "TagEdit": "edits",
          "apply_edit": "edits", "parse_edit": "edits", "ModelStore": "model", "TagModel": "model",
          "current_tags": "state", "user_labels": "state"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"jobs.tag.{_WHERE[name]}"), name)
    raise AttributeError(name)
