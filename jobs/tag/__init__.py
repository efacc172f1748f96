"""``imagelake tag``: concept tags and learned tags (see :mod:`jobs.tag.driver`)."""

from jobs.tag.concepts import concept_tags
from jobs.tag.driver import run_tag, train_model
from jobs.tag.edits import TagEdit, apply_edit, parse_edit
from jobs.tag.model import ModelStore, TagModel
from jobs.tag.state import current_tags, user_labels

__all__ = ["run_tag", "train_model", "concept_tags", "TagEdit", "apply_edit", "parse_edit", "ModelStore",
           "TagModel", "current_tags", "user_labels"]
