# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Label train task for the SACB-Net bundle: the datastore's labelled images become registration pairs.

:py:class:`BundleTrainTask` hands the bundle ``train.json`` a list of ``{"image", "label"}`` records
(``train#dataset#data``, ``validate#dataset#data``). A registration network trains on pairs, so this task turns the
records into the bundle's pair records with ``scripts.io.datalist.make_pairs``: every ordered pair of training images
(``pairing="all_pairs"``, the default) or atlas-to-image pairs (``pairing="atlas"`` with the app's atlas). Training is
unsupervised (labels dropped); validation pairs keep labels for the bundle's Dice metric.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["RegistrationTrainTask"]

TRAIN_DATA = "train#dataset#data"
VALIDATE_DATA = "validate#dataset#data"


class RegistrationTrainTask(BundleTrainTask):
    """
    Args:
        path: bundle root.
        conf: MONAI Label app config; ``pairing`` ("all_pairs" | "atlas"), ``atlas_image`` and ``atlas_label``.
        weights_dir: where training writes its checkpoints and best ``model.pt`` (train.json's ``ckpt_dir``) and
            which ``model.pt`` it starts from when there; None: the bundle's ``models/`` (the bundle is written).
        kwargs: passed on to :py:class:`BundleTrainTask`.
    """

    def __init__(self, path: str, conf: Dict[str, str], weights_dir: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self.weights_dir = weights_dir
        self.pairing = conf.get("pairing", "all_pairs")
        if self.pairing not in ("all_pairs", "atlas"):
            raise ValueError(f"pairing must be 'all_pairs' or 'atlas', got {self.pairing!r}.")
        self.atlas: Optional[Dict[str, str]] = None
        self._training_records: List[Mapping[str, Any]] = []  # set per request by _partition_datalist
        if conf.get("atlas_image"):
            self.atlas = {"image": conf["atlas_image"], "label": conf.get("atlas_label", "")}

    def _make_pairs(self, records: List[Mapping[str, Any]], with_labels: bool) -> List[Dict[str, Any]]:
        # scripts.* is the bundle's own package: import it from the bundle root, as BundleTrainTask does for training
        sys.path.insert(0, self.bundle_path)
        try:
            datalist = importlib.import_module("scripts.io.datalist")
        finally:
            sys.path.remove(self.bundle_path)
        images = [{k: r[k] for k in ("image", "label") if r.get(k)} for r in records]
        pairs = datalist.make_pairs(images, mode=self.pairing, atlas=self.atlas)
        if not with_labels:
            pairs = [{k: v for k, v in p.items() if k in ("moving_image", "fixed_image")} for p in pairs]
        return pairs

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # start from the weights the app serves: its own trained ones once they exist, else the bundle's
        trained = os.path.join(self.weights_dir, "model.pt") if self.weights_dir else None
        super()._load_checkpoint(trained if trained and os.path.isfile(trained) else model_pytorch, pretrained,
                                 train_handlers)

    def _update_overrides(self, overrides: Dict[str, Any]) -> None:
        # train.json writes into its own run folder by default; the app serves <weights_dir>/model.pt once it exists
        # (else the bundle's models/model.pt), so its training writes (and resumes) there on purpose
        overrides.setdefault("ckpt_dir", self.weights_dir or os.path.join(self.bundle_path, "models"))
        overrides[TRAIN_DATA] = self._make_pairs(overrides[TRAIN_DATA], with_labels=False)
        validation = overrides.get(VALIDATE_DATA)
        if validation is not None:
            # pairs need two images: a short validation split borrows from the training images
            records = list(validation)
            if self.pairing == "all_pairs" and len(records) < 2:
                records += self._training_records[: 2 - len(records)]
            overrides[VALIDATE_DATA] = self._make_pairs(records, with_labels=True)

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, validation = super()._partition_datalist(datalist, request, shuffle)
        self._training_records = list(train)
        return train, validation

    def __call__(self, request, datastore):
        # train.json takes network_def, the warp layers and the preprocessing from inference.json through
        # "%configs/inference.json::..." macros, which MONAI resolves relative to the working directory: train from the
        # bundle root, as `python -m monai.bundle run` is run (also for the torchrun subprocess of multi-GPU training)
        with contextlib.chdir(self.bundle_path):
            result = super().__call__(request, datastore)
        return result if result is not None else {}
