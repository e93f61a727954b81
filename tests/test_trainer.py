"""Restarts of Ray Train runs go through the driver (``_internal.trainer``), without a cluster."""

import pytest
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import WorkerGroupError

from realfake_ray._internal.trainer import RestoreFromDriver, fit_with_restarts, lost_workers


def _group_error(**failures: Exception) -> WorkerGroupError:
    return WorkerGroupError("worker group failed", {int(rank[1:]): error for rank, error in failures.items()})


def test_lost_workers_are_dead_actors_failed_health_checks_and_refused_restores_not_code_errors():
    died = ActorDiedError()
    assert lost_workers(_group_error(r0=WorkerHealthCheckFailedError("no answer", died))) == [0]
    assert lost_workers(_group_error(r0=RuntimeError("gloo: connection closed"), r1=died)) == [1]
    assert lost_workers(_group_error(r0=RestoreFromDriver("newer checkpoint"))) == [0]
    assert lost_workers(_group_error(r0=ValueError("a bug"))) == []
    assert lost_workers(died) == []  # only a worker group's failure is judged


def _flaky(failures: list[Exception]):
    calls = []

    def fit(restart: int) -> str:
        calls.append(restart)
        if failures:
            raise failures.pop(0)
        return "result"

    return fit, calls


def test_fit_is_repeated_after_lost_workers_up_to_the_limit(capsys):
    lost = _group_error(r0=ActorDiedError())
    fit, calls = _flaky([lost, lost])
    assert fit_with_restarts(fit, 3, "finetune") == ("result", 2)
    assert calls == [0, 1, 2] and "lost worker(s) [0]; restarting from the newest checkpoint (2/3)" in capsys.readouterr().out
    fit, calls = _flaky([lost, lost])
    with pytest.raises(WorkerGroupError):
        fit_with_restarts(fit, 1, "train")
    assert calls == [0, 1]
    fit, calls = _flaky([lost] * 5)
    assert fit_with_restarts(fit, -1, "train") == ("result", 5)


def test_an_error_in_the_training_code_is_not_retried():
    fit, calls = _flaky([_group_error(r0=ValueError("a bug"))])
    with pytest.raises(WorkerGroupError):
        fit_with_restarts(fit, 3, "train")
    fit, calls = _flaky([KeyError("driver side")])
    with pytest.raises(KeyError):
        fit_with_restarts(fit, 3, "train")
    assert calls == [0]


def test_metrics_rows_round_trip_and_plot_to_any_url(tmp_path):
    import torch

    from realfake_ray import storage
    from realfake_ray._internal.trainer import (
        all_gather_objects,
        all_reduce_sum,
        read_metrics,
        write_curves,
        write_metrics,
    )

    rows = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5}]
    write_metrics("memory://trainer-test/metrics.jsonl", rows)
    assert read_metrics("memory://trainer-test/metrics.jsonl") == rows
    assert read_metrics("memory://trainer-test/absent.jsonl") == []
    url = write_curves("memory://trainer-test/loss.png", rows, "step", ["loss"], "loss", logy=True)
    assert storage.read_bytes(url)[:8] == b"\x89PNG\r\n\x1a\n"
    assert all_gather_objects({"a": 1}) == [{"a": 1}]  # outside a worker group: this process only
    assert all_reduce_sum(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
