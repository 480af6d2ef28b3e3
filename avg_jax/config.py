"""gin plumbing shared by every CLI subcommand: parse files/bindings, save the operative config."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from etils import epath

GIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "gin_configs"
OPERATIVE_CONFIG_NAME = "operative_config.gin"


@contextlib.contextmanager
def _plain_file_readers() -> Iterator[None]:
    """Let gin open config files only as plain files while parsing.

    gin tries each search root in turn with every registered reader; on a miss its package-resource reader
    (gin.resource_reader) reads the path's directories as a Python package name: it logs "ERROR: Path not
    found" for every include found under a later root (`gin_configs/`), imports packages of that name, and
    crashes on a namespace package (a `data/` folder in the working directory). Our configs are files.
    """
    readers = gin.config._FILE_READERS  # no public API to unregister a reader
    saved = list(readers)
    readers[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        readers[:] = saved


def parse_gin(gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> None:
    """Parse gin files then bindings (later ones win); relative paths and includes are looked up in the
    working directory, then in `gin_configs/`."""
    gin.clear_config()
    if str(GIN_CONFIG_DIR) not in gin.config._LOCATION_PREFIXES:  # gin's search roots; '' (the cwd) is first
        gin.add_config_file_search_path(str(GIN_CONFIG_DIR))
    for path in gin_files:
        if not Path(path).exists() and not (GIN_CONFIG_DIR / path).exists():
            raise FileNotFoundError(f"gin file not found: {path} (also looked in {GIN_CONFIG_DIR})")
    with _plain_file_readers():
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params), finalize_config=False)


def write_operative_config(out_dir: str | os.PathLike, name: str = OPERATIVE_CONFIG_NAME) -> epath.Path:
    """Write the gin config actually used (every bound and every called configurable) next to outputs
    (`out_dir` may be a local path or a gs:// URL)."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(gin.operative_config_str())
    return path


def path_from_flag_or_macro(value: str | None, macro: str, flag: str) -> str:
    """`value` when the flag was given, else the gin macro `macro` (experiment configs bind e.g. CORPUS_DIR in
    their data file); call after `parse_gin`."""
    if value:
        return value
    try:
        return str(gin.query_parameter(f"%{macro}"))
    except ValueError:
        raise ValueError(f"{flag} not given and no gin macro {macro} is bound (an experiment's data file binds "
                         f"it; or --gin_param \"{macro} = '...'\")") from None
