"""Image steps, channels last until `layout`: decode bytes, resize, crop, scale, normalize."""
from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from . import Step, register
from .graphs import TextStep

COLOURS = ("rgb", "bgr", "gray")


@register
class DecodeImage(Step):
    """PNG/JPEG bytes (uint8 [n]) -> pixels (uint8 [H, W, C]), C=3 in rgb/bgr order or C=1 for
    gray (ITU-R 601 luma, as PIL's convert("L") rounds it). onnxruntime-extensions' DecodeImage."""

    name = "decode_image"
    custom_op = True

    def __init__(self, colour: str = "rgb"):
        if colour not in COLOURS:
            raise TypeError(f"colour must be one of {COLOURS}, not {colour!r}")
        super().__init__(colour=colour)

    def onnx(self) -> list:
        from onnxruntime_extensions.tools.pre_post_processing.steps import ConvertImageToBGR, ReverseAxis

        colour = self.params["colour"]
        if colour == "bgr":
            return [ConvertImageToBGR()]
        if colour == "rgb":
            return [ConvertImageToBGR(), ReverseAxis(axis=-1, dim_value=3, name="BGRToRGB")]
        return [ConvertImageToBGR(), TextStep("BGRToGray", ["bgr"], ["gray"], _luma)]


def _luma(step: TextStep, types):
    """PIL's L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, from BGR, in int32."""
    (kind, shape), = types
    h, w = shape.split(",")[:2]
    weights = numpy_helper.from_array(np.array([7471, 38470, 19595], np.int32), "luma_weights")
    body = f"""
        wide = Cast <to = 6> ({step.input_names[0]})
        weighted = Mul (wide, luma_weights)
        axes = Constant <value = int64[1] {{-1}}> ()
        total = ReduceSum <keepdims = 1> (weighted, axes)
        half = Constant <value = int32[1] {{32768}}> ()
        scale = Constant <value = int32[1] {{65536}}> ()
        rounded = Add (total, half)
        luma = Div (rounded, scale)
        {step.output_names[0]} = Cast <to = 2> (luma)"""
    return f"uint8[{h},{w},1] {step.output_names[0]}", body, [weights]


class _Resize(nn.Module):
    def __init__(self, size: list[int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        chw = pixels.float().permute(2, 0, 1).unsqueeze(0)
        out = nn.functional.interpolate(chw, size=self.size, mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0)


@register
class Resize(Step):
    """[H, W, C] -> float [h, w, C], bilinear with half-pixel centres and no antialiasing
    (PyTorch's F.interpolate(mode="bilinear", align_corners=False))."""

    name = "resize"

    def __init__(self, size: list[int]):
        super().__init__(size=list(size))

    def onnx(self) -> list:
        h, w = self.params["size"]

        def build(step, types):
            (_, shape), = types
            sizes = numpy_helper.from_array(np.array([h, w], np.int64), "resize_sizes")
            body = f"""
                pixels = Cast <to = 1> ({step.input_names[0]})
                {step.output_names[0]} = Resize <mode = "linear", axes = [0, 1],
                    coordinate_transformation_mode = "half_pixel"> (pixels, , , resize_sizes)"""
            return f"float[{h},{w},{shape.split(',')[2]}] {step.output_names[0]}", body, [sizes]

        return [TextStep("Resize", ["pixels"], ["resized"], build)]

    def torch(self) -> nn.Module:
        return _Resize(self.params["size"])


class _Crop(nn.Module):
    def __init__(self, size: list[int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
        return pixels[top:top + h, left:left + w]


@register
class CenterCrop(Step):
    """[H, W, C] -> [h, w, C], the centre (the top-left one of two when H - h is odd)."""

    name = "center_crop"

    def __init__(self, size: list[int]):
        super().__init__(size=list(size))

    def onnx(self) -> list:
        h, w = self.params["size"]

        def build(step, types):
            (kind, shape), = types
            body = f"""
                dims = Shape ({step.input_names[0]})
                two = Constant <value = int64[1] {{2}}> ()
                hw = Constant <value = int64[2] {{{h}, {w}}}> ()
                zero = Constant <value = int64[1] {{0}}> ()
                height_width = Slice (dims, zero, two)
                margin = Sub (height_width, hw)
                start = Div (margin, two)
                stop = Add (start, hw)
                axes = Constant <value = int64[2] {{0, 1}}> ()
                {step.output_names[0]} = Slice ({step.input_names[0]}, start, stop, axes)"""
            return f"{kind}[{h},{w},{shape.split(',')[2]}] {step.output_names[0]}", body, []

        return [TextStep("CenterCrop", ["pixels"], ["cropped"], build)]

    def torch(self) -> nn.Module:
        return _Crop(self.params["size"])


class _Affine(nn.Module):
    """float(x) * scale + shift, broadcast over the last axis."""

    def __init__(self, scale, shift):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


def _affine_onnx(name: str, scale, shift) -> list:
    def build(step, types):
        (_, shape), = types
        tensors = [numpy_helper.from_array(np.asarray(scale, np.float32), "affine_scale"),
                   numpy_helper.from_array(np.asarray(shift, np.float32), "affine_shift")]
        body = f"""
            values = Cast <to = 1> ({step.input_names[0]})
            scaled = Mul (values, affine_scale)
            {step.output_names[0]} = Add (scaled, affine_shift)"""
        return f"float[{shape}] {step.output_names[0]}", body, tensors

    return [TextStep(name, ["values"], ["out"], build)]


@register
class Scale(Step):
    """x -> float(x) * factor (1/255 maps bytes to [0, 1])."""

    name = "scale"

    def __init__(self, factor: float = 1 / 255):
        super().__init__(factor=float(factor))

    def onnx(self) -> list:
        return _affine_onnx("Scale", self.params["factor"], 0.0)

    def torch(self) -> nn.Module:
        return _Affine(self.params["factor"], 0.0)


@register
class Normalize(Step):
    """x -> (x - mean) / std, per channel (the last axis)."""

    name = "normalize"

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__(mean=list(mean), std=list(std))

    def _scale_shift(self):
        mean, std = np.asarray(self.params["mean"], np.float64), np.asarray(self.params["std"], np.float64)
        return (1 / std).astype(np.float32), (-mean / std).astype(np.float32)

    def onnx(self) -> list:
        return _affine_onnx("Normalize", *self._scale_shift())

    def torch(self) -> nn.Module:
        return _Affine(*self._scale_shift())


class _Layout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(2, 0, 1).unsqueeze(0)


@register
class Layout(Step):
    """[H, W, C] -> [1, C, H, W] (a batch of one, channels first)."""

    name = "layout"

    def __init__(self, to: str = "NCHW"):
        if to != "NCHW":
            raise TypeError(f"layout supports to=NCHW, not {to!r}")
        super().__init__(to=to)

    def onnx(self) -> list:
        from onnxruntime_extensions.tools.pre_post_processing.steps import (ChannelsLastToChannelsFirst,
                                                                            Unsqueeze)

        return [ChannelsLastToChannelsFirst(), Unsqueeze([0])]

    def torch(self) -> nn.Module:
        return _Layout()

