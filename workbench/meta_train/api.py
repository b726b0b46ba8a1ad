"""``meta_train()``: the entry point of the Python API (``workbench meta-train`` on the command line)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .. import _distributed
from ..artifacts import RunStore
from ..data import ImageDataset
from .._runtime import resolve_device, steady_allocator
from ..errors import WorkbenchError
from .config import MetaTrainConfig, RESUME_KINDS
from .trainer import prepare_source
from .runs import MetaTrainResult, _locate_run, _process_device, _run_one, _runtime, _stored_config
from .selection import _run_many, selection_dataset, selection_transfer_config


# ============================================================================================ entry points
def meta_train(config: MetaTrainConfig | Mapping[str, Any] | None = None, store: Optional[RunStore] = None,
               progress: bool = True, *, resume: Optional[str] = None,
               dataset: Optional[ImageDataset] = None) -> MetaTrainResult:
    """Meta-train phi (Python API; ``workbench meta-train`` on the command line).

    config: a :class:`MetaTrainConfig` or a dict of its fields (None with ``resume``: the run's own config).
    store: the run store (default: ``RunStore(config.artifacts_root)``).
    resume: a run id (or run folder) to continue from its last checkpoint; ``config``, if given, must match it.
    dataset: an :class:`ImageDataset` to cut into tasks instead of loading ``config.source`` (e.g. synthetic data).

    Launched by ``torchrun`` the tasks are spread over the processes (see the module docstring); every process
    returns the same phi, rank 0 writes the artifacts.
    """
    if resume is not None:
        store, resume = _locate_run(resume, store, config)
        store.check_resume_kind(resume, RESUME_KINDS, "a meta-train run")  # before its config is read as ours
        stored = MetaTrainConfig.from_dict(_stored_config(store, resume))
        if config is None:
            config = stored
        else:
            config = config if isinstance(config, MetaTrainConfig) else MetaTrainConfig.from_dict(config)
    elif config is None:
        config = MetaTrainConfig()
    elif not isinstance(config, MetaTrainConfig):
        config = MetaTrainConfig.from_dict(config)
    else:
        config.validate()
    if store is None:
        store = RunStore(config.artifacts_root)
    steady_allocator()  # freed feature maps are reused rather than faulted in again every step ($WORKBENCH_MALLOC)
    device = resolve_device(config.device)
    dist = _distributed.setup(device.type)
    clean = False
    try:
        device = _process_device(config, dist)
        with _runtime(config, device):
            data = prepare_source(config, dataset)
            held_out = None
            if config.num_runs > 1 and config.select_target != "heldout":
                # a selection target or recipe that cannot be used fails now, not after the runs
                held_out = selection_dataset(config)
                selection_transfer_config(config, "candidate", device, len(held_out.y_train))
            if config.num_runs > 1:
                result = _run_many(config, data, store, progress, dist, device, resume_id=resume, dataset=dataset,
                                   held_out=held_out)
            else:
                result = _run_one(config, data, store, progress, dist, device, resume_id=resume,
                                  run_id=config.run_name if resume is None else None)
        clean = True
        return result
    except WorkbenchError:
        clean = True  # raised on every process alike (errors that one process sees alone are broadcast first)
        raise
    finally:
        _distributed.shutdown(dist, clean=clean)



