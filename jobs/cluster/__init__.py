"""``imagelake cluster``: near-duplicate groups and topic clusters (see :mod:`jobs.cluster.driver`)."""

from jobs.cluster.driver import check_sim, run_cluster
from jobs.cluster.dups import dup_groups
from jobs.cluster.state import current_state
from jobs.cluster.topics import choose_k, fit_topics

__all__ = ["run_cluster", "check_sim", "dup_groups", "current_state", "choose_k", "fit_topics"]
