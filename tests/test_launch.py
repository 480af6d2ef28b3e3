"""`avg-jax launch-check`'s library in one process: mesh shapes (avg_jax.partitioning), cluster start-up settings
(avg_jax.distributed). (Multi-process: tests/test_tpu_scripts.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from avg_jax import distributed, partitioning

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@needs_8
@pytest.mark.parametrize(("data", "model", "shape"), [
    (-1, 1, (8, 1)), (4, 2, (4, 2)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8)), (8, -1, (8, 1)),
])
def test_mesh_shapes(data, model, shape):
    mesh = partitioning.make_device_mesh(data_parallelism=data, model_parallelism=model)
    assert mesh.axis_names == ("data", "model")
    assert mesh.devices.shape == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@needs_8
@pytest.mark.parametrize(("data", "model", "message"), [
    (3, -1, "does not divide the 8 devices"),
    (-1, -1, "only one of"),
    (0, 1, "data_parallelism=0"),
    (2, -3, "model_parallelism=-3"),
    (2, 2, "uses 4 devices but there are 8"),
    (4, 4, "does not divide the 8 devices"),
])
def test_mesh_bad_shapes(data, model, message):
    with pytest.raises(ValueError, match=message):
        partitioning.make_device_mesh(data_parallelism=data, model_parallelism=model)


def test_mesh_on_a_device_subset():
    mesh = partitioning.make_device_mesh(devices=jax.devices()[:1])
    assert mesh.devices.shape == (1, 1)


@needs_8
def test_sharded_sum_over_the_mesh_single_process():
    """The launch-check reduction on one process: 8 devices, (data=4, model=2)."""
    import gin

    with gin.unlock_config():
        gin.bind_parameter("make_device_mesh.data_parallelism", 4)
        gin.bind_parameter("make_device_mesh.model_parallelism", 2)
        gin.bind_parameter("initialize_distributed.num_processes", 1)  # launch_check enables; 1 = alone
    try:
        result = distributed.launch_check(rows_per_device=2, columns=5)
    finally:
        gin.clear_config()
    rows = np.arange(8 * 2 * 5).reshape(-1, 5) % 1009
    assert result["ok"] and result["sharded_sum"] == rows.sum(axis=0).tolist()
    assert result["mesh"] == {"data": 4, "model": 2} and result["num_processes"] == 1


@pytest.mark.parametrize(("env", "kwargs", "message"), [
    ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_PROCESS_ID": "1.5"}, {}, "JAX_PROCESS_ID='1.5' is not an integer"),
    ({}, {"num_processes": 2, "process_id": 2}, r"process_id=2 is outside \[0, 2\)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, {}, r"process_id=-1 is outside \[0, 2\)"),
    ({}, {"num_processes": 0}, "num_processes=0 must be >= 1"),
])
def test_initialize_distributed_rejects_bad_settings(monkeypatch, env, kwargs, message):
    for name in (distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize_distributed(enabled=True, **kwargs)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(("name", "chips"), [("cpu", None), ("v4-8", 4), ("v4-32", 16), ("v5e-16", 16)])
def test_mesh_gin_files(name, chips):
    """Each mesh config parses, and its mesh covers exactly the slice's chips (one JAX device per chip)."""
    import gin

    from avg_jax import config

    config.parse_gin([f"mesh/{name}.gin"])
    try:
        from avg_jax import partitioning

        rules = partitioning.logical_axis_rules()
        assert ("batch", "data") in rules and ("mlp", "model") in rules
        data = gin.query_parameter("make_device_mesh.data_parallelism")
        model = gin.query_parameter("make_device_mesh.model_parallelism")
        if chips is None:
            assert (data, model) == (-1, 1)
            mesh = partitioning.make_device_mesh()
            assert mesh.devices.shape == (jax.device_count(), 1)
        else:
            assert data * model == chips
            if jax.device_count() >= chips:
                assert partitioning.make_device_mesh(devices=jax.devices()[:chips]).devices.shape == (data, model)
    finally:
        gin.clear_config()


def test_initialize_distributed_disabled_reports_the_single_process(monkeypatch):
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "not even read")
    info = distributed.initialize_distributed(enabled=False)
    assert (info.process_id, info.num_processes) == (0, 1)
    assert info.device_count == jax.device_count() and not jax.distributed.is_initialized()


def test_initialize_distributed_unconfigured_stays_single_process(monkeypatch):
    for name in (distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    info = distributed.initialize_distributed()
    assert info.num_processes == 1 and not jax.distributed.is_initialized()


def test_initialize_distributed_configured_process_count_enables(monkeypatch):
    """With enabled=None a configured (here: invalid) process count means "join": it is validated."""
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "5")
    with pytest.raises(ValueError, match=r"process_id=5 is outside \[0, 2\)"):
        distributed.initialize_distributed()
