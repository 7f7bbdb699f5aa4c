"""MXFP4 weights (what GPT-OSS checkpoints store their experts in), read as bf16.

A quantised tensor `X` of a Hugging Face checkpoint whose config.json says
`quantization_config.quant_method: "mxfp4"` is stored as two uint8 tensors, as transformers'
integrations/mxfp4.py reads them (convert_moe_packed_tensors):

- `X_blocks` [E, R, G, 16]: two FP4 (e2m1) codes a byte, the element at an even position in the low
  nibble, the next one in the high nibble, so one row of 16 bytes is a block of 32 values;
- `X_scales` [E, R, G]: one e8m0 exponent a block, stored with a bias of 127 (value = code * 2^(s-127)).

Dequantised, row r of expert e holds G * 32 values, and the tensor is transposed to the parameter's
layout: X[e, :, r] = row r, so X is [E, G * 32, R] (GptOssExperts' gate_up_proj [E, H, 2F] and
down_proj [E, F, H]). mzoo dequantises on read and never writes MXFP4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Container, Iterable, Optional

import torch

from mzoo.ckpt.hf import CheckpointError

METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
BLOCK_BYTES = 16  # 32 FP4 values a block, two a byte (the MX block size)
SCALE_BIAS = 127

# the e2m1 value of each 4-bit code (bit 3 is the sign), transformers' FP4_VALUES
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive magnitudes, for rounding


@dataclass(frozen=True)
class Packed:
    """One quantised tensor: the names of its two stored halves and its dequantised shape."""

    blocks: str
    scales: str
    shape: tuple[int, ...]


def quant_method(config: dict[str, Any], where: str) -> Optional[str]:
    """config.json's quantization method: None for plain weights, "mxfp4", or a refusal (no other
    method's tensors can be read as weights)."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if not isinstance(method, str):
        raise CheckpointError(f"{where}/config.json has a quantization_config without a quant_method string; fix "
                              "config.json or use an unquantised copy of the checkpoint.")
    if method.lower() != METHOD:
        raise CheckpointError(f"{where} is quantized (config.json's quant_method is '{method}'), which mzoo cannot "
                              "read (it reads unquantised and MXFP4 weights); dequantize the checkpoint to bf16 "
                              "first.")
    return METHOD


def packed_tensors(names: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                   dtype_of: Callable[[str], str], where: str) -> dict[str, Packed]:
    """Every `X_blocks` + `X_scales` pair of an MXFP4 checkpoint, by X, after checking that each uint8
    half has its partner, both halves are uint8 and their shapes agree (a broken pair is refused at
    open); a lone float `X_scales` is an ordinary weight."""
    names = list(names)
    present = set(names)
    out: dict[str, Packed] = {}
    for name in names:
        if not name.endswith((BLOCKS, SCALES)):
            continue
        base = name[: -len(BLOCKS)] if name.endswith(BLOCKS) else name[: -len(SCALES)]
        blocks, scales = base + BLOCKS, base + SCALES
        missing = scales if name == blocks else blocks
        if missing not in present and dtype_of(name) == "U8":  # a lone float `*_scales` is a plain weight
            raise CheckpointError(f"{where} has {name} but no {missing}, so the MXFP4 tensor {base} cannot be "
                                  "dequantized; the copy is incomplete, re-download it.")
        if name != blocks or missing not in present:
            continue
        if base in present:
            raise CheckpointError(f"{where} holds {base} both plain and as MXFP4 {blocks}/{scales}; keep one of "
                                  "them (re-download or re-save the checkpoint).")
        for half in (blocks, scales):
            if dtype_of(half) != "U8":
                raise CheckpointError(f"{where} stores {half} as {dtype_of(half)}, but MXFP4 halves are uint8 (U8); "
                                      "the checkpoint is not MXFP4 as its config says, re-download it.")
        out[base] = Packed(blocks, scales, dequantized_shape(base, shape_of(blocks), shape_of(scales), where))
    return out


def unlabelled_hint(name: str, stored: Container[str]) -> str:
    """Why `name` is missing when its MXFP4 halves are there but config.json does not say MXFP4."""
    if name + BLOCKS in stored and name + SCALES in stored:
        return (f" (it is stored as MXFP4 {name}{BLOCKS}/{SCALES}, but config.json has no quantization_config "
                f"with quant_method '{METHOD}'; restore the checkpoint's config.json)")
    return ""


def dequantized_shape(name: str, blocks: tuple[int, ...], scales: tuple[int, ...], where: str) -> tuple[int, ...]:
    """[E, R, G, 16] blocks with [E, R, G] scales -> [E, G * 32, R], else one sentence why not."""
    if len(blocks) != 4 or blocks[-1] != BLOCK_BYTES or tuple(scales) != tuple(blocks[:-1]):
        raise CheckpointError(
            f"{where} has MXFP4 {name}_blocks {tuple(blocks)} and {name}_scales {tuple(scales)}, but mzoo reads "
            f"[experts, rows, groups, {BLOCK_BYTES}] blocks with [experts, rows, groups] scales; the tensors are "
            "malformed, re-download the checkpoint.")
    experts, rows, groups, _ = blocks
    return (experts, groups * 2 * BLOCK_BYTES, rows)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The [E, G * 32, R] tensor that uint8 blocks [E, R, G, 16] and scales [E, R, G] encode, computed as
    transformers' convert_moe_packed_tensors computes it (same values, same ldexp in `dtype`), one
    expert at a time so the index temporaries stay one expert's size."""
    shape = dequantized_shape("tensor", tuple(blocks.shape), tuple(scales.shape), "dequantize")
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    byte = torch.arange(256)
    pairs = torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1)  # a byte's two values, low nibble first
    experts, rows, groups, width = blocks.shape
    out = torch.empty(shape, dtype=dtype)
    for e in range(experts):
        values = pairs[blocks[e].to(torch.int)].reshape(rows, groups, 2 * width)
        torch.ldexp(values, (scales[e].to(torch.int32) - SCALE_BIAS).unsqueeze(-1), out=values)
        out[e] = values.reshape(rows, groups * 2 * width).T
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an [E, K, R] tensor (K a multiple of 32), the inverse of `dequantize`: each
    block of 32 takes the smallest power-of-two scale that brings it into e2m1's [-6, 6], and each
    value the nearest code (ties to the even code, as the OCP MX spec rounds). Exact for values that
    are e2m1 codes times a block's power of two. mzoo writes no MXFP4; this makes test checkpoints."""
    if weight.dim() != 3 or weight.shape[1] % (2 * BLOCK_BYTES):
        raise ValueError(f"quantize takes [experts, K, rows] with K a multiple of {2 * BLOCK_BYTES}, "
                         f"got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("MXFP4 cannot hold non-finite values")
    experts, k, rows = weight.shape
    x = weight.detach().to(torch.float32).transpose(1, 2).reshape(experts, rows, k // 32, 32).contiguous()
    amax = x.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -SCALE_BIAS))
    exp = exp.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = (x / torch.exp2(exp).unsqueeze(-1)).abs()
    bounds = torch.tensor(_MIDPOINTS)
    low, high = torch.bucketize(scaled, bounds), torch.bucketize(scaled, bounds, right=True)
    code = torch.where(low != high, low + low % 2, low)  # on a midpoint, the even code
    code = code | (torch.signbit(x).to(torch.int64) << 3)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exp.to(torch.int32) + SCALE_BIAS).to(torch.uint8)
