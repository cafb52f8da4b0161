"""FLOPs and parameters, counted the paper's way and by two independent counters.

The paper counts a multiply-add as 2 FLOPs (torchvision ResNet-50: 4.1 GMACs = 8.2 GFLOPS).
We count multiply-adds with fvcore (``torch.jit.trace`` based) and with PyTorch's
``FlopCounterMode`` (dispatch based, 2 FLOPs per multiply-add) and require them to agree. Both
count the same operations: convolutions, linear layers, matrix products, and the attention core
(through the ``sasa::local_attention`` op, see :mod:`sasa_bench.kernels.op`). Neither counts
elementwise ops, softmax, normalisation or pooling; fvcore's default handles for those are
switched off so the two counters see the same set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.kernels.op import attention_macs, counting_flops

if TYPE_CHECKING:
    from sasa_bench.spec import ModelSpec


def _fvcore_handles() -> dict:
    """The multiply-add ops both counters count (fvcore's defaults also count norms and pools)."""
    from fvcore.nn import jit_handles as h

    return {
        "aten::addmm": h.addmm_flop_jit,
        "aten::bmm": h.bmm_flop_jit,
        "aten::_convolution": h.conv_flop_jit,
        "aten::einsum": h.einsum_flop_jit,
        "aten::matmul": h.matmul_flop_jit,
        "aten::mm": h.matmul_flop_jit,
        "aten::linear": h.linear_flop_jit,
        "sasa::local_attention": _fvcore_attention_handle,
    }


@dataclass(frozen=True)
class FlopCount:
    params: int
    macs: int  # multiply-adds for one image

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        """The paper's FLOPS: 2 per multiply-add."""
        return 2 * self.macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _example_input(image_size: int) -> torch.Tensor:
    return torch.zeros(1, 3, image_size, image_size)


def macs_torch(model: nn.Module, image_size: int) -> int:
    """Multiply-adds per image by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), counting_flops(), FlopCounterMode(display=False) as counter:
        model(_example_input(image_size))
    total = counter.get_total_flops()
    return total // 2


def _fvcore_attention_handle(inputs, outputs) -> int:  # noqa: ANN001
    """fvcore handle for ``sasa::local_attention``: the same formula FlopCounterMode uses."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v, row, _col = (get_shape(x) for x in inputs[:5])
    kernel_size = inputs[5].toIValue()
    return attention_macs(q, k is not None, v, row is not None, kernel_size)


def macs_fvcore(model: nn.Module, image_size: int) -> int:
    """Multiply-adds per image by fvcore's ``FlopCountAnalysis`` (it reports multiply-adds)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), counting_flops(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, (_example_input(image_size),))
        analysis.clear_op_handles().set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


def count_flops(model: nn.Module, image_size: int, counter: str = "both") -> FlopCount:
    """Params and multiply-adds per image; ``counter="both"`` checks that the two counters agree.

    timm models are counted with their fused attention switched to explicit matmuls
    (:func:`~sasa_bench.models.timm_models.explicit_attention`), so both counters see it; a timm
    model that cannot run at ``image_size`` (HaloNet needs maps divisible by its block size) is
    one :class:`SasaError` line."""
    from sasa_bench.models.timm_models import explicit_attention

    was_training = model.training
    model.eval()
    # A detector counts its backbone, FPN and heads (the paper's FLOPS), not resize, anchors or NMS.
    counted = model.counted() if hasattr(model, "counted") else model
    try:
        with explicit_attention(counted):
            if counter == "torch":
                macs = macs_torch(counted, image_size)
            elif counter == "fvcore":
                macs = macs_fvcore(counted, image_size)
            else:
                macs = macs_torch(counted, image_size)
                other = macs_fvcore(counted, image_size)
                if other != macs:
                    raise RuntimeError(f"FLOP counters disagree: torch {macs} vs fvcore {other} MACs")
    except AssertionError as e:
        if not hasattr(model, "pretrained_cfg"):  # ours: a bug, not bad input
            raise
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        tb, at = e.__traceback__, ""
        while tb is not None:  # the innermost timm frame says which layer refused
            path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
            if "/timm/" in path:
                at = f" (assertion in timm/{path.rsplit('/timm/', 1)[1]}:{tb.tb_lineno})"
            tb = tb.tb_next
        raise SasaError(f"timm:{name} does not run at {image_size}x{image_size}{at}{': ' + str(e) if str(e) else ''}") from None
    finally:
        model.train(was_training)
    return FlopCount(params=count_params(model), macs=macs)


def spec_flops(spec: ModelSpec, counter: str = "both") -> dict[str, Any]:
    """One model's row, built from its spec: ``{model, params, params_m, gmacs, gflops, image_size}``
    (1 image, the paper's 2 FLOPs per multiply-add). What `sasa-bench flops` prints and every study
    result stores; here, not in ``cli/``, so the study runner can use it."""
    from sasa_bench.models import build_model

    c = count_flops(build_model(spec), spec.image_size, counter=counter)
    return {
        "model": spec.name,
        "params": c.params,
        "params_m": c.params / 1e6,
        "gmacs": c.gmacs,
        "gflops": c.gflops,
        "image_size": spec.image_size,
    }
