"""napari dock widgets. Each module imports only napari/magicgui/Qt and the light core modules at
import time; torch-heavy modules (models, inference) are imported on first use."""
