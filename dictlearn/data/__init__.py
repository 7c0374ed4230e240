"""Activation stores, synthetic ground-truth data, and the training-batch loader."""
from dictlearn.data.loader import Loader
from dictlearn.data.loader import heldout_batches
from dictlearn.data.loader import normalization_scale
from dictlearn.data.store import IncompleteStoreError
from dictlearn.data.store import StoreReader
from dictlearn.data.store import StoreWriter
from dictlearn.data.synthetic import load_true_dictionary
from dictlearn.data.synthetic import recovered_fraction
from dictlearn.data.synthetic import write_synthetic_store
