"""caproj: compress convolutional networks with Cascaded Projection (CaP).

    import caproj
    res = caproj.compress(model, loader, target_macs=0.5)
    caproj.finetune(res.model, loader, epochs=3, teacher=model)
    caproj.evaluate(res.model, test_loader), caproj.save(res.model, "small.pt")

The package reads in layers, imports pointing only downward:
  cli -> bench -> api (compress, CaP, finetune, evaluate, save, load)
  -> methods (cap, methods: the registry of plug-ins over sites)
  -> core (sites, plan, projection, surgery, budget, allocate, metrics, deploy, models, train)
  -> runtime (config, batches, data, stream, dist, resume, utils, errors).
"""

import logging

from caproj.api import Result, compress, evaluate, finetune, load, save
from caproj.cap import CaP
from caproj.config import CAP, FINETUNE, TRAIN, CapConfig, TrainConfig
from caproj.errors import CaprojError
from caproj.methods import METHODS, Job, Method, Selection, register_method
from caproj.sites import Site, find_sites
from caproj.version import __version__

logging.getLogger("caproj").addHandler(logging.NullHandler())

__all__ = [
    "CAP", "FINETUNE", "METHODS", "TRAIN", "CaP", "CapConfig", "CaprojError", "Job", "Method",
    "Result", "Selection", "Site", "TrainConfig", "__version__", "compress", "evaluate",
    "find_sites", "finetune", "load", "register_method", "save",
]
