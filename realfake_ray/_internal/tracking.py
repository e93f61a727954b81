"""Experiment tracking: the stages' metrics in MLflow and TensorBoard, beside their metrics.jsonl and PNGs.

Off by default (``tracking.mlflow_uri`` unset, ``tracking.tensorboard`` false): every call here is then a
no-op that imports neither MLflow nor TensorBoard. When on, a stage calls it where it already writes metrics:

- :meth:`StageRun.start` (the driver, before any Ray work): checks that the trackers can be used and opens the
  stage's MLflow run — named ``<stage>[-<tag>]``, nested under one parent run per ``--out`` — with the resolved
  config as parameters (dotted keys, :func:`flatten_params`) and as the artifact ``config.yaml``;
- :meth:`StageRun.logger` (rank 0 of the Ray Train run): a :class:`MetricLogger`, handed the whole metric
  history each time metrics.jsonl is written, logs the rows each tracker does not hold yet;
- :meth:`StageRun.finish` (the driver, after the outputs): final metrics, PNGs as artifacts, the run finished;
- :func:`log_report` (the run report): its markdown and PNGs as artifacts of the ``--out`` run.

TensorBoard event files go below ``<out>/tensorboard/<stage>[/<tag>]`` (``torch.utils.tensorboard``; on an
object store they are written locally and uploaded at every flush).

A rerun that resumes a stage continues its MLflow run (found by its tags: ``--out``, stage, tag and, for a
classifier, its Ray Train run name) and its TensorBoard folder without duplicate points: MLflow gets only the
steps beyond the last one it holds (a step logged by an interrupted run keeps its first value); TensorBoard gets
the rows after the checkpoint the run resumed from, under ``purge_step``, so TensorBoard drops whatever an
interrupted run logged beyond that checkpoint — as metrics.jsonl does. A failure to log after the start is
printed and the rows are retried at the next log: a tracking server that goes away never stops training.

Example:
    >>> from realfake_ray.config import load_config
    >>> cfg = load_config(preset="tiny", out="runs/tiny", overrides=["tracking.tensorboard=true"])
    >>> run = StageRun.of(cfg, "finetune")  # doctest: +SKIP
    >>> run.start(cfg)  # doctest: +SKIP
    >>> run.logger([], "step").log([{"step": 10, "loss": 0.12}])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from realfake_ray import storage
from realfake_ray.config import ConfigError, RunConfig, dump_config
from realfake_ray.layout import RunLayout

__all__ = ["flatten_params", "evaluation_metrics", "StageRun", "MetricLogger", "log_report"]

log = logging.getLogger(__name__)

_ID_TAG = "realfake.id"  # a digest of the identifying tags: safe to quote in a search filter
_EVENT_FILE = "events.out.tfevents"
_LOCK = threading.Lock()  # one find-or-create at a time per process (two classifiers of one driver)


def _key(name: object) -> str:
    """``name`` with the characters MLflow refuses in a parameter or metric key replaced by ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", str(name))


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{dotted key: value}``: strings as they are, other values as JSON; characters MLflow
    refuses in a key become ``_``.

    Example:
        >>> flatten_params({"seed": 42, "data": {"val": None}, "train": {"milestones": [0.25, 0.5], "arch": "resnet50"}})
        {'seed': '42', 'data.val': 'null', 'train.milestones': '[0.25, 0.5]', 'train.arch': 'resnet50'}
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = prefix + _key(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def evaluation_metrics(evaluation: Mapping) -> dict[str, float]:
    """The headline numbers of an evaluation (what ``run_evaluate`` returns): top-1/top-5 per set, and the
    synthetic-vs-real MMD² figures and near-copy count when they were measured.

    Example:
        >>> evaluation_metrics({"sets": {"val": {"top1": 0.9, "top5": 1.0, "count": 360}},
        ...                     "distribution": {"mmd2": 0.1, "mean_class_mmd2": 0.2, "nn": {"count": 3}}})
        {'eval/val/top1': 0.9, 'eval/val/top5': 1.0, 'eval/distribution/mmd2': 0.1, 'eval/distribution/mean_class_mmd2': 0.2, 'eval/distribution/near_copies': 3.0}
    """
    found = {f"eval/{_key(name)}/{key}": res[key] for name, res in (evaluation.get("sets") or {}).items()
             for key in ("top1", "top5") if res.get(key) is not None}
    dist = evaluation.get("distribution") or {}
    for key, value in (("mmd2", dist.get("mmd2")), ("mean_class_mmd2", dist.get("mean_class_mmd2")),
                       ("near_copies", (dist.get("nn") or {}).get("count"))):
        if value is not None:
            found[f"eval/distribution/{key}"] = value
    return {key: float(value) for key, value in found.items()}


def _numbers(row: Mapping) -> dict[str, float]:
    """The numeric values of a metrics row (strings, None and flags are not metrics)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _after(rows: list[dict], step_key: str, through: float | None) -> list[dict]:
    return [row for row in rows if through is None or row[step_key] > through]


@contextmanager
def _best_effort(what: str) -> Iterator[None]:
    """Tracking after the start never fails the stage: its own files hold every number."""
    try:
        yield
    except Exception as error:  # whatever a tracker raises: say so and carry on
        log.warning(f"{what} failed ({type(error).__name__}: {error}); metrics.jsonl and the PNGs have them")


# ------------------------------------------------------------------------------------------------ MLflow


class _Mlflow:
    """A client of one tracking URI, its experiment, and runs found by their tags (or created)."""

    def __init__(self, uri: str, experiment: str) -> None:
        if uri.startswith(("file:", "/", "~", ".")):
            # a file store the user named: MLflow 3 refuses one unless this is set (it is kept, not developed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(f"tracking.mlflow_uri={uri!r} needs MLflow: pip install 'realfake-ray[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except Exception:
                found = self.client.get_experiment_by_name(name)  # another process created it meanwhile
                if found is None:
                    raise
        return found.experiment_id

    def run(self, tags: dict[str, str], name: str, parent: str | None = None) -> tuple[str, bool]:
        """``(run id, created?)`` of the active run carrying ``tags`` (the oldest, should a race have made two)."""
        identity = hashlib.sha256(json.dumps(tags, sort_keys=True).encode()).hexdigest()[:32]
        with _LOCK:
            runs = self.client.search_runs([self.experiment_id], f"tags.`{_ID_TAG}` = '{identity}'",
                                           max_results=1, order_by=["attributes.start_time ASC"])
            if runs:
                return runs[0].info.run_id, False
            extra = {"mlflow.parentRunId": parent} if parent else {}
            return self.client.create_run(self.experiment_id, run_name=name,
                                          tags={**tags, **extra, _ID_TAG: identity}).info.run_id, True

    def parent(self, out: str) -> str:
        """The run of a whole ``--out``: every stage run is nested below it."""
        run_id, created = self.run({"realfake.out": out}, out.rstrip("/").rsplit("/", 1)[-1] or out)
        if created:  # a folder for the stage runs, not a process: never shown as running
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_metrics(self, run_id: str, points: Iterable[tuple[int, dict[str, float]]]) -> None:
        """Metric values at their steps, ``[(step, {key: value}), ...]``, in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, value, now, step) for step, values in points
                                               for key, value in values.items()])

    def log_files(self, run_id: str, urls: Iterable[str], root: str | None = None) -> None:
        """The files among ``urls`` that exist, as artifacts (below their folder relative to ``root``, if given)."""
        for url in urls:
            if not storage.exists(url):
                continue
            folder = os.path.dirname(storage.relative(url, root)) if root else ""
            with _local_copy(url) as local:
                self.client.log_artifact(run_id, local, folder or None)


@contextmanager
def _local_copy(url: str) -> Iterator[str]:
    """A local path holding the file at ``url`` (the file itself when it is local)."""
    if storage.is_local(url):
        yield storage.local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="realfake-artifact-") as tmp:
        local = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
        with open(local, "wb") as f:
            f.write(storage.read_bytes(url))
        yield local


# ------------------------------------------------------------------------------------------------ TensorBoard


class _EventFiles:
    """A TensorBoard writer of ``url``; a remote ``url`` is written in a local folder, uploaded at every flush."""

    def __init__(self, url: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.url, self.remote = url, not storage.is_local(url)
        self.local = tempfile.mkdtemp(prefix="realfake-tb-") if self.remote else storage.local_path(url)
        if self.remote:
            weakref.finalize(self, shutil.rmtree, self.local, True)
        self.writer = SummaryWriter(self.local, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Everything added so far on disk (torch's writer drains its queue here), and uploaded if remote."""
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                storage.upload_file(os.path.join(self.local, name), storage.join(self.url, name))


def _has_events(url: str) -> bool:
    return storage.isdir(url) and any(name.startswith(_EVENT_FILE) for name, _ in storage.listdir(url))


def _check_tensorboard() -> None:
    try:
        import tensorboard  # torch.utils.tensorboard writes through it
    except ImportError:
        raise ConfigError("tracking.tensorboard=true needs TensorBoard: pip install 'realfake-ray[tensorboard]'") from None


# ------------------------------------------------------------------------------------------------ a stage's run


class _MlflowSink:
    """Rows to the stage's MLflow run: only steps beyond the last one the run holds (asked once, when it connects:
    at once, outside the timed training, and again at the next log should that fail)."""

    what = "MLflow"

    def __init__(self, run: StageRun, step_key: str) -> None:
        self.stage_run, self.mlflow, self.run_id, self.through = run, None, None, None
        with _best_effort("connecting to MLflow"):
            self._connect(step_key)

    def _connect(self, step_key: str) -> None:
        mlflow = self.stage_run._mlflow()
        run_id = self.stage_run._mlflow_run(mlflow)[0]
        held = mlflow.client.get_metric_history(run_id, step_key)
        self.through = max((m.step for m in held), default=None)
        self.mlflow, self.run_id = mlflow, run_id

    def log(self, rows: list[dict], step_key: str) -> None:
        if self.mlflow is None:
            self._connect(step_key)
        new = _after(rows, step_key, self.through)
        if new:
            self.mlflow.log_metrics(self.run_id, [(int(row[step_key]), _numbers(row)) for row in new])
            self.through = new[-1][step_key]


class _TensorBoardSink:
    """Rows to the stage's event files: those after ``through`` (the resumed checkpoint's last row), the first
    session file opened with ``purge_step`` at its first row."""

    what = "TensorBoard"

    def __init__(self, url: str, through: float | None) -> None:
        self.url, self.through, self.events = url, through, None

    def log(self, rows: list[dict], step_key: str) -> None:
        new = _after(rows, step_key, self.through)
        if not new:
            return
        if self.events is None:
            self.events = _EventFiles(self.url, purge_step=int(new[0][step_key]))
        for row in new:
            self.events.scalars(_numbers(row), int(row[step_key]))
        self.events.flush()
        self.through = new[-1][step_key]


class MetricLogger:
    """Logs metric rows to every tracker that is on; ``log(rows)`` takes the whole history each time (the rows a
    tracker already holds are skipped), so it sits where metrics.jsonl is rewritten.

    Example:
        >>> MetricLogger([], "step").log([{"step": 1, "loss": 0.5}])  # no tracker on: nothing happens
    """

    def __init__(self, sinks: list, step_key: str) -> None:
        self._sinks, self.step_key = sinks, step_key

    def log(self, rows: list[dict]) -> None:
        for sink in self._sinks:
            with _best_effort(f"logging metrics to {sink.what}"):
                sink.log(rows, self.step_key)


@dataclass(frozen=True)
class StageRun:
    """One stage's tracked run: the ``tracking`` settings and what identifies it — ``--out``, the stage, its
    ``tag`` (a classifier's ``train.tag``) and a ``key`` for anything else (the classifier's Ray Train run name:
    another key, another run). Picklable; the driver and the rank-0 worker each make it with :meth:`of`.

    Example:
        >>> from realfake_ray.config import load_config
        >>> run = StageRun.of(load_config(preset="tiny", out="/tmp/run"), "train", tag="real")
        >>> run.name, run.enabled, run.tensorboard_dir()
        ('train-real', False, '/tmp/run/tensorboard/train/real')
    """

    out: str
    stage: str
    tag: str | None = None
    key: str | None = None
    mlflow_uri: str | None = None
    experiment: str = "realfake"
    tensorboard: bool = False

    @classmethod
    def of(cls, cfg: RunConfig, stage: str, tag: str | None = None, key: str | None = None) -> StageRun:
        t = cfg.tracking
        return cls(cfg.out, stage, tag, key, t.mlflow_uri, t.mlflow_experiment, t.tensorboard)

    @property
    def name(self) -> str:
        """The MLflow run name: ``<stage>`` or ``<stage>-<tag>``."""
        return f"{self.stage}-{self.tag}" if self.tag else self.stage

    @property
    def enabled(self) -> bool:
        return bool(self.mlflow_uri) or self.tensorboard

    def tensorboard_dir(self) -> str:
        return RunLayout(self.out).tensorboard_dir(self.stage, self.tag)

    def _mlflow(self) -> _Mlflow:
        return _Mlflow(self.mlflow_uri, self.experiment)

    def _mlflow_run(self, mlflow: _Mlflow) -> tuple[str, bool]:
        tags = {"realfake.out": self.out, "realfake.stage": self.stage,
                **({"realfake.tag": self.tag} if self.tag else {}), **({"realfake.key": self.key} if self.key else {})}
        return mlflow.run(tags, self.name, parent=mlflow.parent(self.out))

    def start(self, cfg: RunConfig) -> None:
        """Before any Ray work: check the trackers (a clear error naming the setting) and open or continue the MLflow
        run. A new run gets every config key as a parameter; a continued one the keys it lacks (MLflow keeps a
        parameter's first value); both get this invocation's ``config.yaml``."""
        if self.tensorboard:
            _check_tensorboard()
        if not self.mlflow_uri:
            return
        try:
            mlflow = self._mlflow()
            from mlflow.entities import Param

            run_id, created = self._mlflow_run(mlflow)
            held = {} if created else mlflow.client.get_run(run_id).data.params
            params = [Param(k, v) for k, v in flatten_params(cfg.model_dump(mode="json")).items() if k not in held]
            mlflow.client.log_batch(run_id, params=params)
            mlflow.client.log_text(run_id, dump_config(cfg), "config.yaml")
            if not created:
                mlflow.client.update_run(run_id, status="RUNNING")
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(f"tracking.mlflow_uri={self.mlflow_uri!r}: {type(error).__name__}: {error}") from error

    def logger(self, logged: list[dict], step_key: str, on: bool = True) -> MetricLogger:
        """The metric logger of the Ray Train loop. ``logged``: the rows restored from the checkpoint it resumes from
        (logged by the run that wrote it); ``step_key``: the rows' step (``step``, ``epoch``); ``on``: False on
        every rank but 0 (a logger that does nothing)."""
        sinks: list = []
        if on and self.mlflow_uri:
            sinks.append(_MlflowSink(self, step_key))
        if on and self.tensorboard:
            url = self.tensorboard_dir()
            sinks.append(_TensorBoardSink(url, logged[-1][step_key] if logged and _has_events(url) else None))
        return MetricLogger(sinks, step_key)

    def finish(self, metrics: dict[str, float] | None = None, step: int = 0, files: Iterable[str] = ()) -> None:
        """After the stage's outputs: ``metrics`` (final ones, at ``step``) to both trackers, the ``files`` that exist
        as MLflow artifacts, the MLflow run marked finished."""
        if self.tensorboard and metrics:
            with _best_effort("logging final metrics to TensorBoard"):
                events = _EventFiles(self.tensorboard_dir())
                events.scalars(metrics, step)
                events.flush()
        if self.mlflow_uri:
            with _best_effort("finishing the MLflow run"):
                mlflow = self._mlflow()
                run_id = self._mlflow_run(mlflow)[0]
                if metrics:
                    mlflow.log_metrics(run_id, [(step, metrics)])
                mlflow.log_files(run_id, files)
                mlflow.client.set_terminated(run_id, "FINISHED")


def log_report(cfg: RunConfig, files: Iterable[str]) -> None:
    """The run report's files (URLs below ``--out``: ``report.md``, the PNGs) as artifacts of the ``--out`` run, in
    their folders below it (MLflow only; nothing when ``tracking.mlflow_uri`` is unset).

    Example:
        >>> from realfake_ray.config import load_config
        >>> log_report(load_config(preset="tiny", out="/tmp/run"), ["/tmp/run/report.md"])  # tracking off: nothing
    """
    if not cfg.tracking.mlflow_uri:
        return
    with _best_effort("logging the report to MLflow"):
        mlflow = _Mlflow(cfg.tracking.mlflow_uri, cfg.tracking.mlflow_experiment)
        mlflow.log_files(mlflow.parent(cfg.out), files, root=cfg.out)
