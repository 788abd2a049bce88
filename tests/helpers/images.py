"""What a plot the tests check must be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread


def assert_image(path: Path, min_colours: int = 8) -> None:
    """A PNG that reads back with pixels of at least `min_colours` distinct colours (axes, text,
    and what is drawn), not a blank or one-colour canvas."""
    assert path.is_file() and path.stat().st_size > 0, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, path
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) >= min_colours, f"{path} has {len(colours)} colours"
