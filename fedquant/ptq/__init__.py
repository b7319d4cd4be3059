"""Post-training quantization (PTQ) of the final global model: RTN, AdaRound, BRECQ, MRECG.

After federated training the server holds a float model; PTQ turns it into integer
weights (per output channel, ``ptq-weight-bits``) and, with calibration images,
quantized layer inputs (per tensor, ``ptq-act-bits``), without retraining. The methods
(PAPERS.md, section C; ``fedquant.config.PTQMethod``):

* RTN: round-to-nearest on MSE-chosen grids; with ``act_bits = 32`` it needs no data,
  the usual situation of an FL server.
* AdaRound (Nagel et al., ICML 2020): learned up/down rounding, layer by layer.
* BRECQ (Li et al., ICLR 2021): the same, block by block, activation steps learned too;
  optionally QDrop (Wei et al., ICLR 2022).
* MRECG (Ma et al., CVPR 2023, arXiv 2303.11906): BRECQ with adjacent blocks merged
  where the module capacity drops most. In the authors' code the merged modules are
  hard-coded per model; here the capacities are computed (data-free or from
  calibration data) and the grouping is the pure function :func:`group_units`.

This is not DPQuant's training-time fake quantization (``fedquant.fakequant``,
``QConv2d``/``QLinear``); PTQ's layers are :class:`~fedquant.ptq.layers.PTQLayer`.

Modules, in data-flow order: ``quantizers`` (affine grids, MSE ranges, activation
quantizer), ``adaround`` (rounding variables, regularizer, schedule), ``layers``
(PTQLayer, PTQModel), ``units`` (reconstruction units of each model), ``reconstruct``
(the optimization loop, QDrop), ``mrecg`` (capacities, grouping), ``quantize``
(:func:`quantize_model`), ``export`` (:func:`save_quantized`, :func:`load_quantized`).
"""

from fedquant.ptq.export import PTQFileError, load_quantized, save_quantized
from fedquant.ptq.layers import PTQLayer, PTQModel
from fedquant.ptq.mrecg import group_units
from fedquant.ptq.pipeline import quantize_model
from fedquant.ptq.result import PTQResult

__all__ = [
    "PTQFileError",
    "PTQLayer",
    "PTQModel",
    "PTQResult",
    "group_units",
    "load_quantized",
    "quantize_model",
    "save_quantized",
]
