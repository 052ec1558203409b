"""Pictures: captioned image panels (PNG) for comparing renderings."""

from .panels import panel_image, save_panels

__all__ = ["panel_image", "save_panels"]
