"""Training data for the Navier–Stokes prior: GRF initial vorticities evolved by the serial solver, in Zarr."""

from enkg_dist.data.generate import generate_dataset, open_dataset, sample_key

__all__ = ["generate_dataset", "open_dataset", "sample_key"]
