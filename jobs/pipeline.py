"""``imagelake run``: every job in order, incrementally, on one Spark session, under one lock.

The steps are named in :data:`STEPS` as ``"module:function"`` strings and imported only when a run
needs them. Every step of a run must import: a default run (no ``--steps``) whose install lacks a
step's module or one of its packages fails before anything runs, with exit code 2 and a message
naming the step, the missing module and the fix (install the extra, or leave the step out with
``--steps``). Scheduled runs therefore never report success while a step silently did nothing. A step function is called with the arguments it
accepts among :class:`PipelineRequest`'s fields (by name, checked against its signature)::

    fn(lake, settings, *, runner=..., progress=..., images=..., collection=..., model=..., device=...,
       precision=...)

and must be incremental (a re-run on unchanged input does nothing new), record its own
``job_runs`` row with :func:`jobs.runs.job_run`, and return a summary (a dataclass or a dict) whose
``run_id``, ``rows_in``/``new``/``pending`` and ``rows_out``/``embedded``/... the pipeline copies
into its own ``job_runs`` row (``job = "pipeline"``, ``metrics.steps``).

A second run of the same lake while one is running exits at once with :class:`LockHeld` (exit
code 3): scheduled runs never overlap. A failing step stops the run; :class:`StepFailed` (or the
step's own error class, re-raised with the step named) says which step and why.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from jobs.runner import Runner, make_runner
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import ensure_tables, open_table
from lake.errors import BadInput, ImagelakeError, LockHeld
from lake.lock import LakeLock
from lake.settings import Settings

__all__ = ["STEPS", "DEFAULT_STEPS", "PipelineRequest", "PipelineSummary", "StepFailed", "StepUnavailable",
           "parse_steps", "resolve_step", "run_pipeline"]

log = logging.getLogger("imagelake.pipeline")

#: Step name -> ``"module:function"``, in the order a run executes them. Point a name at the real
#: driver function when its job lands; nothing else in the pipeline changes.
STEPS: dict[str, str] = {
    "ingest": "jobs.ingest.driver:run_ingest",
    "quality": "jobs.quality.driver:run_quality",
    "embed": "jobs.embed.driver:run_embed",
    "suggest": "jobs.suggest:run_suggest",
    "index": "jobs.index.driver:run_index",
    "outliers": "jobs.outliers:run_outliers",
    "cluster": "jobs.cluster.driver:run_cluster",
    "tag": "jobs.tag.driver:run_tag",
    "grid": "jobs.grid.driver:run_grid",
}
DEFAULT_STEPS: tuple[str, ...] = tuple(STEPS)

#: Summary attributes/keys read as a step's rows in and rows out, first present wins.
_ROWS_IN = ("rows_in", "new", "pending", "selected")
_ROWS_OUT = ("rows_out", "embedded", "committed_rows", "rows", "ok")


class StepUnavailable(BadInput):
    """A step of the run cannot be imported: its module, a package it needs, or its function is missing."""


class StepFailed(ImagelakeError):
    """A step raised something that is not one of the lake's own errors (a bug, a Spark failure)."""


@dataclass(frozen=True)
class PipelineRequest:
    """What a run was asked to do. Steps receive the fields their function accepts, by name."""

    images: str | None = None
    collection: str | None = None
    model: str = "efficientnet-lite0"
    device: str = "auto"
    precision: str = "auto"  # embed: auto, fp32, bf16 or fp16 (part of the features key)
    steps: tuple[str, ...] | None = None  # None: every step in STEPS (each must be installed)


@dataclass
class PipelineSummary:
    run_id: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        parts = ", ".join(f"{s['step']} {s.get('rows_out') or 0} rows out in {s['seconds']:.1f} s"
                          for s in self.steps)
        return f"run {self.run_id}: {len(self.steps)} steps ({parts}) in {self.seconds:.1f} s"


def parse_steps(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"ingest,embed"`` -> ``("ingest", "embed")`` in pipeline order.

    Raises:
        BadInput: an unknown or repeated step name, or none at all.
    """
    if text is None:
        return DEFAULT_STEPS
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise BadInput(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    if not names:
        raise BadInput(f"--steps names no step; steps are {', '.join(STEPS)}")
    if len(set(names)) != len(names):
        raise BadInput(f"--steps repeats a step: {','.join(names)}")
    return tuple(n for n in STEPS if n in names)


def resolve_step(name: str) -> Callable[..., Any]:
    """Import the function registered for ``name``.

    Raises:
        StepUnavailable: the step's module, a module it imports, or the function is missing; the
            message names the missing module.
    """
    target = STEPS[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or str(e)
        if module_name == missing or module_name.startswith(missing + "."):
            raise StepUnavailable(f"step {name} is not in this install: no module {module_name}") from None
        raise StepUnavailable(f"step {name} needs module {missing!r}, which is not installed") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise StepUnavailable(f"step {name} is not in this install: {target} does not exist")
    return fn


def _resolve(requested: Sequence[str] | None) -> dict[str, Callable[..., Any]]:
    """Every step of the run, imported; all that fail are named in one error.

    ``requested`` None means every step: a step missing from the install is then a failure too,
    not a skip, and the message says which ``--steps`` list leaves the missing ones out.
    """
    names = parse_steps(requested)
    functions, errors = {}, []
    for name in names:
        try:
            functions[name] = resolve_step(name)
        except StepUnavailable as e:
            errors.append(str(e))
    if errors:
        rest = [n for n in names if n in functions]
        fix = "install the missing packages (pip install 'imagelake[all]' has every step's)"
        if rest:
            fix += f", or leave {'that step' if len(errors) == 1 else 'those steps'} out: --steps {','.join(rest)}"
        raise StepUnavailable("; ".join(errors) + "; " + fix)
    return functions


def _features_key(lake: Lake, model: str) -> str | None:
    """The stored ``features.model`` key of registry name ``model`` when this run has no embed
    step: its current version's key with the most rows, in whatever precision (``+bf16``). A full
    key (``name@version``, e.g. imported with ``imagelake embed --import``) is taken as it is."""
    if "@" in model:
        return model
    try:
        from jobs.embed.models import get_model
    except ImportError:
        return None  # no embed extra: later steps use the model with the most features
    from lake.vectors import features_key

    key = get_model(model).key
    return features_key(lake, key) or key


def _step_kwargs(lake: Lake, name: str, fn: Callable[..., Any], request: PipelineRequest, runner: Runner,
                 progress: bool, embedded_key: str | None) -> dict[str, Any]:
    offered = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name != "steps"}
    offered.update(runner=runner, progress=progress)
    if name != "embed":  # steps after embed select features by their stored key, not the registry name
        offered["model"] = embedded_key or _features_key(lake, request.model)
        offered.pop("precision", None)
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in offered.items() if v is not None}
    return {k: v for k, v in offered.items() if k in params and v is not None}


def _read(summary: Any, names: Sequence[str]) -> Any:
    for n in names:
        v = summary.get(n) if isinstance(summary, dict) else getattr(summary, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return None


def _recorded_rows(lake: Lake, run_id: str) -> tuple[int | None, int | None]:
    """rows_in/rows_out of the step's own ended ``job_runs`` row (the authoritative counts)."""
    import pyarrow.compute as pc

    t = open_table(lake, "job_runs").to_pyarrow_table(columns=["run_id", "state", "rows_in", "rows_out"])
    t = t.filter(pc.and_(pc.equal(t["run_id"], run_id), pc.not_equal(t["state"], "running")))
    if not t.num_rows:
        return None, None
    return t["rows_in"][0].as_py(), t["rows_out"][0].as_py()


def _record(lake: Lake, name: str, summary: Any, seconds: float) -> dict[str, Any]:
    run_id = summary.get("run_id") if isinstance(summary, dict) else getattr(summary, "run_id", None)
    rows_in, rows_out = _recorded_rows(lake, run_id) if isinstance(run_id, str) else (None, None)
    return {"step": name, "run_id": run_id,
            "rows_in": rows_in if rows_in is not None else _read(summary, _ROWS_IN),
            "rows_out": rows_out if rows_out is not None else _read(summary, _ROWS_OUT),
            "seconds": round(seconds, 3)}


def _step_error(name: str, e: BaseException) -> BaseException:
    """The error to raise for step ``name``: the same lake error class, with the step named."""
    msg = f"step {name} failed: {e}"
    if isinstance(e, ImagelakeError):
        try:
            err = type(e)(msg)
        except TypeError:
            err = StepFailed(msg)
        return err
    return StepFailed(f"step {name} failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:1000])


def run_pipeline(lake: Lake, settings: Settings, request: PipelineRequest, runner: Runner | None = None,
                 progress: bool = False) -> PipelineSummary:
    """Run ``request.steps`` in order on one runner (one Spark session), under the ``pipeline`` lock.

    Args:
        request: the steps and their inputs; ``images`` is required when ``ingest`` is a step.
        runner: reuse this runner (left open); else one is made from ``settings`` and closed.
    Returns:
        the run id and, per step, its own run id, rows in/out and seconds.
    Raises:
        LockHeld: another pipeline run holds this lake (exit code 3 in the CLI).
        StepUnavailable: a step of the run (every step, without ``request.steps``) is not
            installed: its module or a package it imports is missing (checked before anything runs).
        StepFailed, or the failing step's own error class: a step failed; the message names it.
    """
    functions = _resolve(request.steps)  # fail before taking locks or starting Spark
    steps = tuple(functions)
    if "ingest" in steps and not request.images:
        raise BadInput("the ingest step needs --images SRC (or leave ingest out with --steps)")
    lake.ensure()
    ensure_tables(lake)
    with LakeLock(lake, "pipeline", timeout=0, holder="imagelake run"):
        owned = runner is None
        runner = runner or make_runner(settings, progress=progress)
        try:
            args = {"steps": list(steps), "images": request.images, "collection": request.collection,
                    "model": request.model, "device": request.device, "precision": request.precision,
                    "master": settings.master,
                    "runner": settings.runner}
            with job_run(lake, "pipeline", args, settings=settings) as run:
                summary = PipelineSummary(run.run_id)
                run.metrics["steps"] = summary.steps
                embedded_key = None  # the features key the embed step wrote (it names the precision)
                for name in steps:
                    fn = functions[name]
                    t0 = time.perf_counter()
                    log.info("pipeline %s: step %s", run.run_id, name)
                    try:
                        result = fn(lake, settings, **_step_kwargs(lake, name, fn, request, runner, progress,
                                                                   embedded_key))
                    except LockHeld as e:
                        raise LockHeld(f"step {name}: {e}") from e
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as e:
                        summary.steps.append({"step": name, "error": f"{type(e).__name__}: {e}"[:500],
                                              "seconds": round(time.perf_counter() - t0, 3)})
                        raise _step_error(name, e) from e
                    summary.steps.append(_record(lake, name, result, time.perf_counter() - t0))
                    if name == "embed" and isinstance(result, dict) and isinstance(result.get("model"), str):
                        embedded_key = result["model"]
                run.rows_in = (summary.steps[0].get("rows_in") or 0) if summary.steps else 0
                run.rows_out = sum(s.get("rows_out") or 0 for s in summary.steps)
            summary.seconds = run.metrics.get("seconds", 0.0)
            return summary
        finally:
            if owned:
                runner.close()
