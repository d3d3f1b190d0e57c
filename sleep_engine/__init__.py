"""Sleep Lab's engine: a mixture-of-experts memory model that learns while awake and consolidates
while asleep (docs/DESIGN.md). `load_pretrained(DIR)` opens an export (docs/export.md) as a
transformers model."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"   # the lab's shipped data (passages, anchors, probes)


def load_pretrained(path, quantize: str | None = None, device: str = "cpu"):
    """A transformers model of a Sleep Lab export, its experts and fast weights included."""
    from .export import load_pretrained as _load
    return _load(path, quantize=quantize, device=device)
