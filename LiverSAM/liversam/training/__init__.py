"""LiverSAMTrain core: fine-tune LiverSAM's SAM-family model on segmented CT studies.

Pipeline: :mod:`.studies` (find and read studies) -> :mod:`.split` (by patient) -> :mod:`.cache` (HDF5:
windowed liver slices, labels, geometry, frozen-encoder embeddings) -> :mod:`.trainer` (prompt
simulation, augmentation, Dice+BCE, AdamW + cosine schedule, per-epoch validation, checkpoints, resume)
-> :mod:`.report` (registration, test report). Nothing here imports Slicer or Qt; nothing runs at import.
"""

from .benchmark import benchmark_training_throughput
from .config import (
    AugmentationConfig,
    LabelConfig,
    PromptSimulationConfig,
    TrainingConfig,
    TrainingConfigError,
    cpu_has_fast_bf16,
    resolve_precision,
)
from .split import DataSplit, split_patients, split_single_study_slices
from .studies import LoadedStudy, TrainingDataError, TrainingStudy, discover_studies, load_study
from .trainer import HISTORY_COLUMNS, Trainer, TrainingResult, TrainingRunError, train

__all__ = [
    "HISTORY_COLUMNS",
    "AugmentationConfig",
    "DataSplit",
    "LabelConfig",
    "LoadedStudy",
    "PromptSimulationConfig",
    "Trainer",
    "TrainingConfig",
    "TrainingConfigError",
    "TrainingDataError",
    "TrainingResult",
    "TrainingRunError",
    "TrainingStudy",
    "benchmark_training_throughput",
    "cpu_has_fast_bf16",
    "discover_studies",
    "load_study",
    "resolve_precision",
    "split_patients",
    "split_single_study_slices",
    "train",
]
