"""napari-sartorius: Mask R-CNN ensembles for neuronal cell segmentation in phase contrast."""

__version__ = "0.1.0"
