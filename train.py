"""Train a Linear-Llama3: ``python train.py [--gin_file F]... [--gin_param B]... [--workdir D]``.

With no flags it trains configs/tiny.gin on the devices present. Gin binds the frozen config
dataclasses (TrainConfig, ModelConfig, DataConfig, MeshConfig, OptimizerConfig,
CheckpointConfig, DistributedConfig); the library itself never sees gin.
"""

from __future__ import annotations

import argparse
import os
import sys

import gin

from lasp2_jax import config, train
from lasp2_jax.data import DataConfig
from lasp2_jax.models import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = dict(model=ModelConfig, data=DataConfig, mesh=config.MeshConfig,
                optimizer=config.OptimizerConfig, checkpoint=config.CheckpointConfig,
                distributed=config.DistributedConfig)
CONFIGURABLES = {cls.__name__: gin.external_configurable(cls, module="lasp2_jax")
                 for cls in (*SECTIONS.values(), config.TrainConfig)}


def build_config(gin_files, gin_params) -> config.TrainConfig:
    """Parse gin files and bindings into a TrainConfig (each section bound separately)."""
    # `include "configs/x.gin"` resolves from the repository root, wherever we run from.
    gin.add_config_file_search_path(HERE)
    try:
        gin.parse_config_files_and_bindings(gin_files, gin_params)
        sections = {name: CONFIGURABLES[cls.__name__]() for name, cls in SECTIONS.items()}
        return CONFIGURABLES["TrainConfig"](**sections)
    except (ValueError, TypeError, OSError) as e:  # unknown names, bad syntax, missing files
        raise config.ConfigError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable); default configs/tiny.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="gin binding, e.g. 'TrainConfig.steps = 20' (repeatable)")
    parser.add_argument("--workdir", default=None,
                        help="checkpoints, metrics and the resolved config; "
                             "default runs/<first config's name>")
    args = parser.parse_args(argv)
    files = args.gin_file or [os.path.join(HERE, "configs", "tiny.gin")]
    cfg = build_config(files, args.gin_param)
    workdir = args.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(files[0]))[0])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    result = train.run(cfg, workdir)
    if result.status == "nonfinite":
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except config.ConfigError as e:  # a bad setting: its message, not a traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
