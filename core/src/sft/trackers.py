"""Which experiment trackers record a run (`logging.trackers`), and the config check for them.

    enabled(config)        # ["tensorboard", "mlflow"]: the names a tracker plugin acts on
    problems(config, plugins)   # a tracker that is not installed -> its install command

Each tracker is a plugin (plugins/tensorboard, plugins/mlflow, plugins/wandb) that registers its
name with `sft_register_trackers` and records through the lifecycle hooks. `logging.trackers:
null` keeps the behaviour from before the field existed: TensorBoard when its plugin is
installed, unless `logging.tensorboard: false`.
"""

from __future__ import annotations

from typing import Any

from sft.errors import Problem, did_you_mean

#: Trackers that ship with sft as plugins, with their install commands.
KNOWN_TRACKERS = {
    "tensorboard": "pip install -e plugins/tensorboard",
    "mlflow": "pip install -e plugins/mlflow",
    "wandb": "pip install -e plugins/wandb",
}


def enabled(config: Any) -> list[str]:
    """The trackers that record this run."""
    log = config.logging
    if log.trackers is not None:
        return list(log.trackers)
    return ["tensorboard"] if log.tensorboard else []


def problems(config: Any, plugins: Any) -> list[Problem]:
    log, out = config.logging, []
    if log.trackers is None:
        return []
    if not log.tensorboard and "tensorboard" in log.trackers:
        out.append(
            Problem(
                "logging.tensorboard",
                "is false but logging.trackers names tensorboard",
                "remove logging.tensorboard (logging.trackers alone decides)",
            )
        )
    for name in log.trackers:
        if name in plugins.trackers:
            continue
        if name in KNOWN_TRACKERS:
            msg, hint = f"{name!r} is not installed", f"install it with: {KNOWN_TRACKERS[name]}"
        else:
            known = set(KNOWN_TRACKERS) | set(plugins.trackers)
            guess = did_you_mean(name, known)
            msg = f"unknown tracker {name!r}"
            hint = (
                f"did you mean {guess!r}? " if guess else ""
            ) + f"known: {', '.join(sorted(known))}"
        out.append(Problem("logging.trackers", msg, hint))
    if len(set(log.trackers)) != len(log.trackers):
        out.append(Problem("logging.trackers", f"lists a tracker twice: {log.trackers}"))
    return out
