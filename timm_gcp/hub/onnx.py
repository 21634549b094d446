"""ONNX export of any timm model, GCP or not (`timm-gcp onnx`): timm's own `timm.utils.onnx.onnx_export` on the
model in export mode, then the file checked with onnxruntime on sample images."""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.utils.onnx import onnx_export, onnx_forward
from torch import nn

from ..training.data import create_dataloader, create_eval_dataset

__all__ = ['OnnxReport', 'OnnxCheckError', 'export_onnx']


class OnnxCheckError(RuntimeError):
    """onnxruntime's output of the exported file differs from the PyTorch model's."""


@dataclass
class OnnxReport:
    path: Path
    exporter: str  # 'torchscript' (timm's default) or 'dynamo'
    images: int  # sample images checked; 0: random input
    onnx_difference: float  # largest |onnxruntime − PyTorch in export mode| over the sample's outputs
    export_mode_difference: float  # largest |PyTorch in export mode − exact PyTorch|: the export paths' error
    output_scale: float  # largest |exact PyTorch output|


def _set_exportable(model: nn.Module, enable: bool) -> None:
    if hasattr(model, 'set_exportable'):  # GCP models; other timm models export as they are
        model.set_exportable(enable)


def _sample_batch(model: nn.Module, data_dir: Optional[Union[str, Path]], batch_size: int,
                  img_size: Optional[int]) -> Tuple[torch.Tensor, int]:
    """(images, count): the first `batch_size` validation images of `data_dir` as the model's eval transform makes
    them, or random input of the model's size (count 0)."""
    overrides = {'input_size': (3, img_size, img_size)} if img_size else {}
    config = resolve_data_config(overrides, model=model)
    if data_dir is None:
        return torch.randn(batch_size, *config['input_size']), 0
    dataset = create_eval_dataset(data_dir)
    dataset.transform = create_transform(**config)
    images = next(iter(create_dataloader(dataset, batch_size, False, 0)))[0]
    return images, len(images)


def export_onnx(model_name: str, output: Union[str, Path], *, checkpoint: Optional[str] = None,
                pretrained: Optional[bool] = None, num_classes: Optional[int] = None, data_dir: Optional[str] = None,
                batch_size: int = 8, img_size: Optional[int] = None, dynamo: bool = False, opset: Optional[int] = None,
                tolerance: float = 1e-4) -> OnnxReport:
    """Export `model_name` (a timm name, `local-dir:DIR` or `hf-hub:ORG/NAME`; pretrained weights unless
    `checkpoint` is given, as timm's onnx_export.py) to `output` with a dynamic batch size, built with
    `exportable=True` so that GCP heads take their export path.

    The sample batch (images of `data_dir`, else random) is run by the exact model and in export mode (where a
    meta-layer's export path is off the exact layer on it, `timm_gcp.ExportAccuracyError`), exported, and run by
    onnxruntime: an output further than `tolerance` x the largest output from export mode's raises OnnxCheckError.
    Nothing is left at `output` unless every check passed.
    """
    for package in ('onnx', 'onnxruntime'):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"ONNX export needs {package}: pip install 'timm-gcp[onnx]'")
    kwargs = {} if num_classes is None else {'num_classes': num_classes}
    model = timm.create_model(model_name, pretrained=not checkpoint if pretrained is None else pretrained,
                              checkpoint_path=checkpoint or '', exportable=True, **kwargs).eval()
    sample, images = _sample_batch(model, data_dir, batch_size, img_size)
    with torch.no_grad():
        _set_exportable(model, False)
        exact = model(sample)
        _set_exportable(model, True)
        exported = model(sample)
    output = Path(output)
    partial = output.with_name(f'{output.name}.partial')
    try:
        onnx_export(model, str(partial), example_input=sample, use_dynamo=dynamo, opset=opset, check=True)
        difference = (torch.from_numpy(onnx_forward(str(partial), sample)) - exported).abs().max().item()
        scale = exported.abs().max().item()
        if not difference <= tolerance * scale:
            raise OnnxCheckError(f'onnxruntime output differs from the PyTorch model by {difference:.2e} '
                                 f'(allowed {tolerance} x {scale:.3g}); not written')
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    return OnnxReport(output, 'dynamo' if dynamo else 'torchscript', images, difference,
                      (exported - exact).abs().max().item(), exact.abs().max().item())
