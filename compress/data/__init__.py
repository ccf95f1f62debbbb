"""Calibration and evaluation text: corpora (:mod:`.corpora`) and the MediaWiki stripper behind
``builtin:wiki`` (:mod:`.wiki`)."""

from compress.data.corpora import (
    BUILTIN_DATASETS,
    BuiltinDataset,
    Split,
    calibration_batch,
    dataset_problem,
    fetch_dataset,
    load_texts,
    token_windows,
)
from compress.data.wiki import strip_wiki_markup

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "Split",
    "calibration_batch",
    "dataset_problem",
    "fetch_dataset",
    "load_texts",
    "strip_wiki_markup",
    "token_windows",
]
