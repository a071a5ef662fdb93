"""Trains one sweep run: ``python experiments/train_run.py RUN_DIR``.

``RUN_DIR/run_spec.json`` (written by ``experiments/sweep.py``) names the config file
(``path[:variants]``, relative to the repository root or absolute) and the overrides, dotted
field -> value. The config is built exactly as ``tce_jax.main`` builds it from
``--config=path:variants --config.field=value ...``, then ``train.train_and_evaluate`` runs in
``RUN_DIR``, resuming from its latest checkpoint if there is one. Re-running a finished run
retrains nothing beyond the last step and rewrites the final reports.

Overrides of fields the config does not have fail, as with the locked command-line config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_config(config: str):
    """``'path/to/config.py[:variants]'`` -> the ConfigDict of its ``get_config``."""
    path, _, variants = config.partition(":")
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)
    module_spec = importlib.util.spec_from_file_location("_run_config", path)
    if module_spec is None or module_spec.loader is None or not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} not found.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variants) if variants else module.get_config()


def apply_overrides(config, overrides: dict[str, Any]):
    """Sets dotted fields with ConfigDict's type-safe assignment, as ``--config.field=value``
    does (an int for a float field becomes a float, a list for a tuple field a tuple); a field
    the config lacks fails rather than being added."""
    for key in overrides:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                field = ".".join(parts[: i + 1])
                raise KeyError(f"Config has no field {field!r} ({key}); check the grid's spelling.")
            node = node[part]
    config.update_from_flattened_dict(overrides)
    return config


def build_config(spec: dict[str, Any]):
    return apply_overrides(load_config(spec["config"]), spec.get("overrides", {}))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    workdir = os.path.abspath(argv[1])
    with open(os.path.join(workdir, "run_spec.json")) as f:
        spec = json.load(f)
    config = build_config(spec)
    from tce_jax import startup

    startup.start(config)
    from tce_jax import train

    print(f"=== {spec.get('arm', '?')} seed {spec.get('seed', '?')}: {spec['config']} "
          f"{json.dumps(spec.get('overrides', {}), sort_keys=True)}", flush=True)
    train.train_and_evaluate(config, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
