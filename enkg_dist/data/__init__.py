"""Training data for the Navier–Stokes prior: GRF initial vorticities evolved by the serial solver, in Zarr."""

from enkg_dist.data.generate import dataset_attributes, generate_dataset, open_dataset, sample_key, training_splits

__all__ = ["dataset_attributes", "generate_dataset", "open_dataset", "sample_key", "training_splits"]
