"""Save/restore our T5 params with orbax, the config as JSON beside them (no pickle anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from avg_jax.json_io import read_json
from avg_jax.t5.configs import T5Config
from avg_jax.t5.model import init_params

CONFIG_FILE = "t5_config.json"
PARAMS_DIR = "params"


def save_t5_checkpoint(directory: str | Path, params: dict, config: T5Config, overwrite: bool = False) -> Path:
    """Write `directory/t5_config.json` and the orbax params tree `directory/params`."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"T5 checkpoint already exists: {directory / PARAMS_DIR} (pass overwrite=True)")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
    checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(config.to_json())
    return directory


def load_t5_config(directory: str | Path) -> T5Config:
    path = Path(directory) / CONFIG_FILE
    return T5Config.from_dict(read_json(path, "T5 checkpoint config"), source=str(path))


def restore_t5_checkpoint(directory: str | Path, shardings: Any = None) -> tuple[dict, T5Config]:
    """(params, config) from `save_t5_checkpoint`; `shardings` (a tree like params) places them, default device 0."""
    directory = Path(directory).absolute()
    config = load_t5_config(directory)
    if not (directory / PARAMS_DIR).exists():
        raise FileNotFoundError(f"T5 checkpoint params not found: {directory / PARAMS_DIR}")
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract)
    return params, config
