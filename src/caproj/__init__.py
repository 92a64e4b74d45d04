"""caproj: compress convolutional networks with Cascaded Projection (CaP).

    import caproj
    res = caproj.compress(model, loader, target_macs=0.5)   # or unlabeled batches, or
    res = caproj.compress(model, synthetic=5000, example_inputs=x)   # no data at all
    caproj.finetune(res.model, loader, epochs=3, teacher=model)
    caproj.evaluate(res.model, test_loader), caproj.save(res.model, "small.pt")

The package reads in layers, imports pointing only downward:
  cli -> bench -> api (compress, CaP, finetune, evaluate, save, load)
  -> methods (cap, methods: the registry of plug-ins over sites)
  -> core (sites, plan, projection, surgery, factored, budget, allocate, latency, metrics, deploy,
     models, train, synth)
  -> runtime (config, batches, data, stream, dist, resume, utils, errors).
"""

import logging

from caproj.api import (
    Report,
    Result,
    compress,
    evaluate,
    finetune,
    load,
    measure_fit,
    save,
    synthesize,
)
from caproj.cap import CaP
from caproj.config import (
                           CAP,
                           FINETUNE,
                           PRESETS,
                           SYNTH,
                           TRAIN,
                           CapConfig,
                           Preset,
                           SynthConfig,
                           TrainConfig,
                           choose_preset,
)
from caproj.errors import CaprojError
from caproj.factored import Factored
from caproj.methods import METHODS, Job, Method, Selection, register_method
from caproj.sites import Site, find_sites
from caproj.surgery import match_weight_scale
from caproj.synth import Synthetic
from caproj.version import __version__

logging.getLogger("caproj").addHandler(logging.NullHandler())

__all__ = [
    "CAP", "FINETUNE", "METHODS", "PRESETS", "TRAIN", "CaP", "CapConfig", "CaprojError",
    "Factored", "Job", "Method", "Preset", "Report", "Result", "SYNTH", "Selection", "Site",
    "SynthConfig", "Synthetic", "TrainConfig", "__version__", "choose_preset", "compress",
    "evaluate", "find_sites", "finetune", "load", "match_weight_scale", "measure_fit",
    "register_method", "save", "synthesize",
]
