"""reidkit: person re-identification with compressed self-attention (Chen et al., IJCAI 2020).

The Python API (`reidkit.api`): `load_model(checkpoint)` embeds images, `GalleryIndex`
builds, saves, loads and searches gallery features, `open_gallery` opens what `extract`
wrote (a folder or Milvus), and `GalleryFilter` restricts a search by camera, time or path.
They are imported on first use, so the command line starts without loading torch.
"""

__version__ = "0.1.0"

__all__ = [
    "GalleryFilter",
    "GalleryIndex",
    "ReidModel",
    "__version__",
    "load_model",
    "open_gallery",
]


def __getattr__(name: str):
    if name in ("GalleryFilter", "GalleryIndex", "ReidModel", "load_model", "open_gallery"):
        from reidkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'reidkit' has no attribute {name!r}")
