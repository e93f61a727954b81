"""The run lease: one job per --out at a time (fake clock, short timeouts; local disk, memory:// and S3)."""

import importlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import forbid_ray_work

from realfake_ray import storage
from realfake_ray._internal import lease as lease_module
from realfake_ray._internal.lease import (
    LeaseHeldError,
    LeaseLostError,
    LeaseSettings,
    RunLease,
    run_lease,
    takes_run_lease,
    this_process,
)
from realfake_ray.cli import main as cli_main
from realfake_ray.config import load_config
from realfake_ray.layout import RunLayout

NOW = 1_700_000_000.0
FAST = LeaseSettings(timeout_s=60, settle_s=0)
OTHER = {"host": "gpu-node-7", "pid": 4242, "scope": "another-machine", "ray_job_id": "02000000",
         "ray_submission_id": "raysubmit_abc123", "command": "jobs/scale_in1k.py --mult 10"}


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"memory://lease-tests/{os.path.basename(tmp_path)}/run"


def _clock(t: float = NOW):
    return lambda: t


def _write_lease(out: str, owner: dict, heartbeat_age: float, acquired_age: float = 3600, now: float = NOW,
                 **extra) -> dict:
    """A lease as another job leaves it: its last heartbeat ``heartbeat_age`` seconds before ``now``."""
    record = {"format": 1, "token": "their-token", "owner": owner, "acquired_at": now - acquired_age,
              "heartbeat_at": now - heartbeat_age, "heartbeat_s": 5.0, **extra}
    storage.write_json(RunLayout(out).lease_url(), record)
    return record


def _stored(out: str) -> dict | None:
    url = RunLayout(out).lease_url()
    return storage.read_json(url) if storage.exists(url) else None


def _wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_settings_from_the_environment_and_a_bad_value_named():
    assert LeaseSettings.from_env({}) == LeaseSettings(timeout_s=60.0, settle_s=1.0)
    assert LeaseSettings.from_env({"REALFAKE_LEASE_TIMEOUT_S": "120", "REALFAKE_LEASE_SETTLE_S": "0"}) == \
        LeaseSettings(timeout_s=120.0, settle_s=0.0)
    assert LeaseSettings(timeout_s=60).heartbeat_s == 5.0
    for name, bad in (("REALFAKE_LEASE_TIMEOUT_S", "soon"), ("REALFAKE_LEASE_TIMEOUT_S", "0"),
                      ("REALFAKE_LEASE_SETTLE_S", "-1")):
        with pytest.raises(ValueError, match=f"{name}='{bad}'"):
            LeaseSettings.from_env({name: bad})


def test_the_owner_names_the_ray_job_and_its_submission(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "03000000")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_XyZ", "job_name": "raysubmit_XyZ"}}))
    owner = this_process()
    assert (owner["ray_job_id"], owner["ray_submission_id"], owner["pid"]) == ("03000000", "raysubmit_XyZ", os.getpid())
    monkeypatch.delenv("RAY_JOB_ID")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert (this_process()["ray_job_id"], this_process()["ray_submission_id"]) == (None, None)


def test_the_lease_names_its_owner_while_held_and_is_gone_after(out):
    with RunLease(out, FAST, clock=_clock()) as lease:
        stored = _stored(out)
        assert lease.url == storage.join(out, "_lease.json")
        assert stored["token"] == lease.token and stored["heartbeat_at"] == stored["acquired_at"] == NOW
        assert stored["owner"]["pid"] == os.getpid() and stored["owner"]["host"] == this_process()["host"]
        assert "pytest" in stored["owner"]["command"] or "test" in stored["owner"]["command"]
    assert _stored(out) is None


def test_a_fresh_lease_of_another_job_is_refused_naming_that_job(out):
    theirs = _write_lease(out, OTHER, heartbeat_age=4, acquired_age=3600)
    with pytest.raises(LeaseHeldError) as refused:
        RunLease(out, FAST, clock=_clock()).acquire()
    message = str(refused.value)
    for part in ("in use by another job", "host gpu-node-7", "pid 4242", "raysubmit_abc123", "Ray job 02000000",
                 "jobs/scale_in1k.py --mult 10", "since 2023-11-14 21:13:20 UTC", "last heartbeat 4 s ago",
                 f"delete {RunLayout(out).lease_url()}", "Wait for that job to end", "60 s"):
        assert part in message, (part, message)
    assert _stored(out) == theirs  # untouched


def test_a_stale_lease_is_taken_over_with_a_line_saying_whose(out, capsys):
    _write_lease(out, OTHER, heartbeat_age=100)
    with RunLease(out, FAST, clock=_clock()) as lease:
        assert _stored(out)["token"] == lease.token
    printed = capsys.readouterr().out
    assert "[lease] took over" in printed and "host gpu-node-7, pid 4242" in printed
    assert "its last heartbeat was 100 s old (timeout 60 s" in printed


def test_the_holders_own_heartbeat_period_counts_before_calling_it_stale(out):
    _write_lease(out, OTHER, heartbeat_age=80, heartbeat_s=30.0)  # 3 missed beats = 90 s > the 60 s timeout
    with pytest.raises(LeaseHeldError):
        RunLease(out, FAST, clock=_clock()).acquire()
    _write_lease(out, OTHER, heartbeat_age=95, heartbeat_s=30.0)
    with RunLease(out, FAST, clock=_clock()):
        pass


def test_an_unreadable_lease_is_taken_over(out, capsys):
    storage.write_text(RunLayout(out).lease_url(), "not json")
    with RunLease(out, FAST, clock=_clock()):
        pass
    assert "not a lease this version can read" in capsys.readouterr().out


def test_a_lease_whose_process_is_gone_from_this_machine_is_taken_over_at_once(out, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lease(out, {**this_process(), "pid": dead.pid}, heartbeat_age=1)
    with RunLease(out, FAST, clock=_clock()):
        pass
    assert f"its process (pid {dead.pid} on this machine) is gone" in capsys.readouterr().out
    # a live process of this machine, or a dead pid of another pid namespace: its heartbeat decides
    _write_lease(out, {**this_process(), "pid": os.getppid()}, heartbeat_age=1)
    with pytest.raises(LeaseHeldError, match=f"pid {os.getppid()}"):
        RunLease(out, FAST, clock=_clock()).acquire()
    _write_lease(out, {**this_process(), "pid": dead.pid, "scope": "other-boot/pid:[1]"}, heartbeat_age=1)
    with pytest.raises(LeaseHeldError):
        RunLease(out, FAST, clock=_clock()).acquire()


# A local disk with no lease there creates it exclusively: test_only_one_of_many_creators_wins_on_a_local_disk.
@pytest.mark.parametrize("where,stale_lease_there", [("memory", False), ("memory", True), ("local", True)])
def test_of_two_jobs_writing_at_once_the_one_read_back_wins(where, stale_lease_there, tmp_path):
    """Both jobs found no lease (or the same stale one) and write theirs: this one first, the other during this
    one's settle pause. This one reads back the other's and backs off, leaving the other's lease alone."""
    out = str(tmp_path / "run") if where == "local" else f"memory://lease-race/{os.path.basename(tmp_path)}"
    if stale_lease_there:
        _write_lease(out, {**OTHER, "host": "crashed-node"}, heartbeat_age=600)
    pauses = []

    def the_other_job_writes(seconds: float) -> None:
        pauses.append(seconds)
        _write_lease(out, OTHER, heartbeat_age=0)

    mine = RunLease(out, LeaseSettings(timeout_s=60, settle_s=1.5), clock=_clock(), sleep=the_other_job_writes)
    with pytest.raises(LeaseHeldError, match="in use by another job .host gpu-node-7, pid 4242"):
        mine.acquire()
    assert pauses == [1.5] and _stored(out)["token"] == "their-token"


def test_only_one_of_many_creators_wins_on_a_local_disk(tmp_path):
    out = str(tmp_path / "run")
    leases = [RunLease(out, FAST) for _ in range(8)]
    start = threading.Barrier(len(leases))
    outcome: dict[int, str] = {}

    def take(i: int) -> None:
        start.wait()
        try:
            leases[i].acquire()
            outcome[i] = "won"
        except LeaseHeldError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, result in outcome.items() if result == "won"]
    assert len(outcome) == 8 and len(winners) == 1
    assert _stored(out)["token"] == leases[winners[0]].token
    leases[winners[0]].release()


def test_a_local_disk_without_hard_links_reads_back_instead(tmp_path, monkeypatch):
    def no_links(*_args):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    pauses = []
    with RunLease(str(tmp_path / "run"), FAST, sleep=pauses.append) as lease:
        assert _stored(str(tmp_path / "run"))["token"] == lease.token
    assert pauses == [0]


def test_reentrant_within_a_process(tmp_path):
    out = str(tmp_path / "run")

    @takes_run_lease
    def stage(cfg):
        """A stage."""
        return _stored(cfg.out)["token"]

    class Cfg:
        pass

    cfg = Cfg()
    cfg.out = out
    with run_lease(out, FAST) as outer:
        with run_lease(f"file://{out}/") as inner:  # another spelling of the same run
            assert inner is outer
        assert stage(cfg) == outer.token and _stored(out)["token"] == outer.token
    assert _stored(out) is None and stage.__doc__ == "A stage." and stage(cfg) != outer.token
    with pytest.raises(LeaseHeldError):  # another process's (here: another object's) lease is not joined
        with RunLease(out, FAST):
            stage(cfg)


def test_released_on_an_exception(out):
    with pytest.raises(KeyError):
        with run_lease(out, FAST):
            raise KeyError("boom")
    assert _stored(out) is None
    with run_lease(out, FAST):  # and taken again at once
        pass


def test_the_heartbeat_moves_while_held(out):
    ticks = iter(range(10**6))
    with RunLease(out, LeaseSettings(timeout_s=0.12, settle_s=0), clock=lambda: NOW + next(ticks)) as lease:
        first = _stored(out)["heartbeat_at"]
        _wait_for(lambda: _stored(out)["heartbeat_at"] > first + 1, "two heartbeats")
        assert _stored(out)["token"] == lease.token and _stored(out)["acquired_at"] < first


def test_a_lease_taken_over_while_held_is_reported_and_left_to_its_new_owner(out, capsys):
    lease = RunLease(out, LeaseSettings(timeout_s=0.12, settle_s=0))
    lease.acquire()
    # written until the heartbeat sees it (a beat between its read and its write would put this job's back)
    _wait_for(lambda: _write_lease(out, OTHER, heartbeat_age=0) and lease.lost is not None, "the heartbeat to notice")
    theirs = _stored(out)
    assert theirs["token"] == "their-token"
    with pytest.raises(LeaseLostError, match="taken over by host gpu-node-7, pid 4242"):
        lease.release()
    assert _stored(out) == theirs and "[lease] warning: LOST" in capsys.readouterr().out


def test_on_s3_refused_taken_and_released(s3_bucket):
    out = f"{s3_bucket}/run"
    _write_lease(out, OTHER, heartbeat_age=2)
    with pytest.raises(LeaseHeldError, match="gpu-node-7"):
        RunLease(out, FAST, clock=_clock()).acquire()
    _write_lease(out, OTHER, heartbeat_age=200)
    with run_lease(out, LeaseSettings(timeout_s=60, settle_s=0.05)) as lease:
        assert json.loads(storage.read_text(f"{out}/_lease.json"))["token"] == lease.token
    assert not storage.exists(f"{out}/_lease.json")
    assert not lease_module._HELD  # nothing left registered


ENTRY_POINTS = [
    ("realfake_ray.stages.caption.driver", "run_caption"),
    ("realfake_ray.stages.encode.driver", "run_encode"),
    ("realfake_ray.stages.finetune.driver", "run_finetune"),
    ("realfake_ray.stages.generate.driver", "run_generate"),
    ("realfake_ray.stages.train.driver", "run_train"),
    ("realfake_ray.stages.evaluate.driver", "run_evaluate"),
    ("realfake_ray.stages.pipeline", "run_pipeline"),
    ("realfake_ray.tools.tune_sampler.driver", "run_tune_sampler"),
    ("realfake_ray.tools.audit_privacy.driver", "run_audit_privacy"),
]


@pytest.mark.parametrize("module,name", ENTRY_POINTS)
def test_every_entry_point_takes_the_lease_before_any_work(module, name, tmp_path, monkeypatch):
    forbid_ray_work(monkeypatch)
    out = str(tmp_path / "run")
    _write_lease(out, {**OTHER, "host": "elsewhere"}, heartbeat_age=0, acquired_age=0, now=time.time())
    before = sorted(storage.find(out))
    with pytest.raises(LeaseHeldError, match="host elsewhere"):
        getattr(importlib.import_module(module), name)(load_config(preset="tiny", out=out))
    assert sorted(storage.find(out)) == before  # nothing written


def test_the_cli_says_who_holds_the_run_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    _write_lease(out, OTHER, heartbeat_age=0, acquired_age=0, now=time.time())
    assert cli_main(["generate", "--preset", "tiny", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"realfake generate: error: {out} is in use by another job (host gpu-node-7, pid 4242")
    assert len(err.strip().splitlines()) == 1
