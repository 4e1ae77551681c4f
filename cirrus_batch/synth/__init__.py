"""Synthetic long-wave infrared (8-14 µm) all-sky camera archives with true cloud masks.

Physics (band Planck radiance, layered clear-sky emission, cloud layers seen through the air below),
camera kinds (projection, image circle, housing, obstacles, sensor drift and defects) and the archive
layout are described in ``docs/synth.md``. Everything is deterministic from ``seed``: the camera from
``(seed, 0, camera kind)``, night *i* from ``(seed, 1, i)``, its cloud fields from ``(seed, 3, i)``,
the noise of frame *k* from ``(seed, 2, i, k)``, so nights can be rendered in any order or in parallel.
"""

from cirrus_batch.synth.archive import (
    SynthSummary,
    default_truth_path,
    geometry_attrs,
    matrix,
    montage,
    read_fits,
    render_night,
    write_archive,
    write_fits,
)
from cirrus_batch.synth.bodies import Site
from cirrus_batch.synth.camera import ADU_MAX, CAMERA_KINDS, DEFAULT_CAMERA, Camera, Pointing, make_camera
from cirrus_batch.synth.render import TAU_MIN, NightRenderer
from cirrus_batch.synth.sky import KINDS, Layer, Night, make_night

__all__ = [
    "ADU_MAX", "CAMERA_KINDS", "DEFAULT_CAMERA", "KINDS", "TAU_MIN", "Camera", "Layer", "Night",
    "NightRenderer", "Pointing", "Site", "SynthSummary", "default_truth_path", "geometry_attrs", "make_camera", "make_night",
    "matrix", "montage", "read_fits", "render_night", "write_archive", "write_fits",
]  # fmt: skip
