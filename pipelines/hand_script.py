"""The hand-written INT8 ONNX export `make bench` compares a cold pipeline cell with.

    python -m pipelines.hand_script CHECKPOINT OUT_DIR

What a user writes without this project, for the demo model: load the checkpoint, export with
torch.onnx (dynamo), onnxruntime's quant_pre_process, then quantize_static (QDQ, per-channel
s8 weights, u8 activations, MinMax) on 256 training images. It verifies, audits and times
nothing: the pipeline's cell does all three, so the comparison is in the hand script's favour.
"""
from __future__ import annotations

import sys
from pathlib import Path

CALIBRATION_IMAGES = 256


def export(checkpoint: Path, out_dir: Path) -> Path:
    import torch
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    from models.digits import DigitsCNN, train_split

    model = DigitsCNN()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, prepared, int8 = out_dir / "model.onnx", out_dir / "model.pre.onnx", out_dir / "model.int8.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), fp32, input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, dynamo=True)
    quant_pre_process(str(fp32), str(prepared))

    class Images(CalibrationDataReader):
        def __init__(self):
            self.images = iter(train_split(CALIBRATION_IMAGES)["image"])

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {"image": image}

    quantize_static(str(prepared), str(int8), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(export(Path(sys.argv[1]), Path(sys.argv[2])))
