"""Actor pools fitted to the cluster (``_internal/cluster.py``): no Ray needed."""

import pytest

from realfake_ray._internal.cluster import fit_cpu_pool
from realfake_ray.config import ActorPool, ConfigError


def test_a_cpu_pool_that_would_take_every_cpu_is_shrunk_and_says_so(capsys):
    # 2 actors x 1 CPU on 2 CPUs left nothing for generate's read/write tasks: the stage hung.
    fitted = fit_cpu_pool(ActorPool(min_size=2, max_size=2), 2.0, 0.5, "generate.actors")
    assert (fitted.min_size, fitted.max_size) == (1, 1)
    assert "generate.actors: 2 actors x 1 CPU" in capsys.readouterr().out


def test_a_pool_that_fits_is_unchanged():
    pool = ActorPool(min_size=2, max_size=2, cpus_per_actor=0.75)  # the tiny preset on 2 cores
    assert fit_cpu_pool(pool, 2.0, 0.5, "generate.actors") is pool
    assert fit_cpu_pool(ActorPool(min_size=1, max_size=8), 16.0, 1.0, "encode.actors").max_size == 8
    zero = ActorPool(min_size=4, max_size=4, cpus_per_actor=0)
    assert fit_cpu_pool(zero, 1.0, 1.0, "evaluate.actors") is zero


def test_only_the_upper_end_shrinks_when_the_minimum_fits():
    fitted = fit_cpu_pool(ActorPool(min_size=2, max_size=6), 4.0, 1.0, "generate.actors")
    assert (fitted.min_size, fitted.max_size) == (2, 3)


def test_an_actor_larger_than_the_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match=r"generate.actors.cpus_per_actor=4: the cluster has 2 CPUs"):
        fit_cpu_pool(ActorPool(cpus_per_actor=4), 2.0, 0.5, "generate.actors")


def test_the_no_ray_guard_catches_data_train_and_tune_work(no_ray):
    import ray.data
    import ray.train.torch
    import ray.tune

    for work in (lambda: ray.data.from_items([1]), lambda: ray.train.torch.TorchTrainer(lambda: None),
                 lambda: ray.tune.Tuner(lambda config: None), lambda: ray.init(), lambda: ray.remote(len),
                 lambda: ray.put(1)):
        with pytest.raises(AssertionError, match="Ray work started"):
            work()
