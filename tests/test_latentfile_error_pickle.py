"""A damaged latent read in a DataLoader worker reaches the main process as LatentFileError, naming the file."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from medlatent.latentfile import LatentFileError


def test_latent_file_error_survives_pickling():
    err = pickle.loads(pickle.dumps(LatentFileError("/data/a.latent.safetensors", "checksum mismatch")))
    assert isinstance(err, LatentFileError)
    assert err.path == "/data/a.latent.safetensors" and err.problem == "checksum mismatch"
    assert str(err) == "/data/a.latent.safetensors: checksum mismatch"


class _Damaged(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise LatentFileError(f"item-{i}.latent.safetensors", "bytes do not match the SHA-256 in the index")


def test_worker_error_keeps_its_class_and_file():
    # PyTorch re-raises a worker's exception as its class built from one message (worker, traceback, our text)
    with pytest.raises(LatentFileError, match=r"item-\d\.latent\.safetensors: bytes do not match"):
        next(iter(DataLoader(_Damaged(), num_workers=1)))
    whole = LatentFileError("Caught LatentFileError in DataLoader worker process 0: item-0.latent.safetensors: bad")
    assert whole.path == "" and pickle.loads(pickle.dumps(whole)).problem == whole.problem
