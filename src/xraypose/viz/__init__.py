"""Pictures: captioned image panels (PNG) for comparing renderings, and benchmark plots (matplotlib)."""

from .panels import panel_image, save_panels
from .plots import plot_error_cdf, plot_success_vs_initial_error

__all__ = ["panel_image", "plot_error_cdf", "plot_success_vs_initial_error", "save_panels"]
