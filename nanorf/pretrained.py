"""Official pretrained weights into nanorf: DINOv3 encoders and Qwen3 decoders.

    from nanorf.pretrained import load_dinov3, load_qwen3
    vit = load_dinov3("dinov3_vits16_pretrain_lvd1689m-08c60483.pth")   # -> nanorf.vit.ViT
    model = load_qwen3("Qwen3-0.6B/")                                    # -> nanorf.model.RFModel

Both loaders read local files only: both model families are gated downloads (DINOv3 under the
DINOv3 License, Qwen3 under Apache-2.0), and nanorf never fetches. They return float32 modules
and raise `nanorf.checkpoint.CheckpointError` with a one-line message for a file that is
missing, truncated, of another model, or of mismatched shapes. How each maps the official
tensors: nanorf/dinov3.py and nanorf/qwen3.py; file reading: nanorf/weight_files.py.
"""

from nanorf.dinov3 import load_dinov3
from nanorf.qwen3 import load_qwen3

__all__ = ["load_dinov3", "load_qwen3"]
