"""MetaNAS (Elsken et al., CVPR 2020): DARTS as the task learner inside REPTILE, with soft-pruning.

Public API::

    config = MetaNasConfig.preset("tiny")            # or "paper", "paper_miniimagenet", "cpu"
    meta = reptile_meta_train(config, task_source, rngs=make_rngs(0), progress=cb, checkpoint_dir=d)
    task_model = adapt_task(meta, support_x, support_y, rngs=make_rngs(1))
    scripted = export_task_model(task_model, "model.pt")
    task_model.genotype.to_json()

See docs/METANAS.md for the mapping to the paper.
"""

from engine.metanas.adapt import TaskModel, adapt_task, export_task_model
from engine.metanas.config import OPERATIONS, PRESET_NAMES, MetaNasConfig, MetaNasConfigError
from engine.metanas.discrete import MetaNasTaskNet, build_task_network, count_parameters
from engine.metanas.genotype import Genotype, GenotypeError, derive_genotype
from engine.metanas.search_net import MetaNasSearchNet, temperature_at
from engine.metanas.tasks import (
    SyntheticTaskSource,
    TaskBatch,
    TaskBatchError,
    as_task_batch,
    sampler_task_source,
)
from engine.metanas.train import (
    MetaNasCheckpointError,
    MetaState,
    initial_meta_state,
    reptile_meta_train,
    reptile_update,
    train_on_task,
)

__all__ = [
    "OPERATIONS",
    "PRESET_NAMES",
    "Genotype",
    "GenotypeError",
    "MetaNasCheckpointError",
    "MetaNasConfig",
    "MetaNasConfigError",
    "MetaNasSearchNet",
    "MetaNasTaskNet",
    "MetaState",
    "SyntheticTaskSource",
    "TaskBatch",
    "TaskBatchError",
    "TaskModel",
    "adapt_task",
    "as_task_batch",
    "build_task_network",
    "count_parameters",
    "derive_genotype",
    "export_task_model",
    "initial_meta_state",
    "reptile_meta_train",
    "reptile_update",
    "sampler_task_source",
    "temperature_at",
    "train_on_task",
]
