"""What int4 reads, in both formats: block-wise 4-bit weights, one scale per `group_size` weights
along each Linear layer's input width (and along each embedding row)."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import PipelineError

# what both formats' 4-bit kernels take: MatMulNBits a power of two >= 16, XNNPACK a multiple of 32
# (executorch/backends/xnnpack/operators/node_visitor.py: "Delegation to XNNPACK requires
# group_size to be a multiple of 32"; a smaller group leaves the layer out of the delegate, and
# torchao's quantize ops have no portable kernel: lowering fails)
GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Options:
    group_size: int = 32  # weights per scale; a layer whose input width is not a multiple stays float
    embeddings: bool = True  # the embedding tables at 4 bits too (else they stay float)

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")

    def fits(self, width: int) -> bool:
        """Whether a weight of this input width splits into whole groups."""
        return width % self.group_size == 0


def nothing_quantized(options: Int4Options, narrow: list[str]) -> PipelineError:
    """The error when a model has no weight int4 applies to."""
    return PipelineError(
        "precision=int4 found no Linear (MatMul) or embedding weight to quantize"
        + (f": {', '.join(narrow)} have an input width that is not a multiple of group_size="
           f"{options.group_size}" if narrow else " (int4 quantizes Linear layers and embedding tables, "
                                                  "not convolutions)"),
        fix="set precision.options.group_size to a divisor of the layers' widths" if narrow
        else "use precision=int8 for a convolutional model", stage="quantize")
