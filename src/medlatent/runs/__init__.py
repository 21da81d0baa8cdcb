"""Runs over sets of files — encode, decode, roundtrip — as library calls under the command line.

Each run finds its inputs, chooses and loads its models, and works through the items with resume and a manifest;
it reports progress to a :class:`RunListener` and returns a :class:`RunResult`. What the user must fix raises
:class:`RunError` with one line to show; failures of single items are in the result.
"""

from medlatent.runs.common import NothingToDo, RunListener, RunResult
from medlatent.runs.decode import decode_files
from medlatent.runs.encode import StoreRunResult, encode_files, encode_to_store
from medlatent.runs.models import ModelChoice, ModelLoadError, RunError, compile_model, load_model
from medlatent.runs.roundtrip import roundtrip_files

__all__ = ["ModelChoice", "ModelLoadError", "NothingToDo", "RunError", "RunListener", "RunResult", "StoreRunResult",
           "compile_model", "decode_files", "encode_files", "encode_to_store", "load_model", "roundtrip_files"]
