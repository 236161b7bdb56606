"""Dataset files are data: a CIFAR-100 pickle runs nothing while it loads."""
import builtins
import os
import pickle
import shutil
import struct
import warnings

import numpy as np
import pytest

from data import DatasetError, build_loaders

from .conftest import loader_kwargs


class _Calls:
    """Pickles as a call of ``function(*args)``: what an attacker's pickle runs while it loads."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker):
    return {"os.system": _Calls(os.system, f"touch {marker}"), "builtins.open": _Calls(builtins.open, str(marker), "w")}


@pytest.mark.parametrize("name", ["train", "test", "meta"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
@pytest.mark.parametrize("where", ["whole file", "inside the dict"])
def test_a_cifar100_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, cifar_root, name, payload, where):
    shutil.copytree(cifar_root, tmp_path / "root")
    folder = tmp_path / "root" / "cifar-100-python"
    marker = tmp_path / "pwned"
    with open(folder / name, "rb") as f:
        content = pickle.load(f, encoding="latin1")
    evil = _payloads(marker)[payload]
    with open(folder / name, "wb") as f:
        pickle.dump(evil if where == "whole file" else {**content, "data": evil, "fine_label_names": evil}, f,
                    protocol=2)
    with pytest.raises(DatasetError) as info:
        build_loaders("cifar100", **loader_kwargs(root=str(tmp_path / "root")))
    assert not marker.exists()  # nothing ran
    message = str(info.value)
    assert "\n" not in message and f"{folder / name}: " in message and "refused, not run" in message
    assert f"re-extract {'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'}" in message
    assert "data.download=true" in message


def _py2(value) -> bytes:
    """``value`` pickled as Python 2's cPickle (protocol 2) writes CIFAR-100's files: str as byte strings,
    numpy 1's array globals (``numpy.core``)."""
    if isinstance(value, (str, bytes)):
        raw = value.encode("latin1") if isinstance(value, str) else value
        return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return b"J" + struct.pack("<i", value)
    if value is None:
        return b"N"
    if isinstance(value, tuple):
        return b"(" + b"".join(map(_py2, value)) + b"t"
    if isinstance(value, list):
        return b"](" + b"".join(map(_py2, value)) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in value.items()) + b"u"
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8
    dtype = b"cnumpy\ndtype\n" + _py2(("u1", 0, 1)) + b"R" + _py2((3, "|", None, None, None, -1, -1, 0)) + b"b"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2((0,)) + b"U\x01b\x87R"
            + b"(" + _py2(1) + _py2(value.shape) + dtype + _py2(False) + _py2(value.tobytes()) + b"tb")


def test_cifar100_in_python2s_format_loads(tmp_path, cifar_root):
    """The official files: Python 2 pickles naming numpy.core (numpy 2 calls it numpy._core)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    originals = {}
    for name in ("train", "test", "meta"):
        with open(f"{cifar_root}/cifar-100-python/{name}", "rb") as f:
            originals[name] = pickle.load(f, encoding="latin1")
        (folder / name).write_bytes(b"\x80\x02" + _py2(originals[name]) + b".")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 names numpy.core's _reconstruct without a deprecation warning
        _, _, test = build_loaders("cifar100", **loader_kwargs(root=str(tmp_path)))
    assert np.array_equal(test.dataset.base.images.reshape(len(test.dataset), -1),
                          originals["test"]["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(-1, 3072))
    assert test.dataset.base.targets.tolist() == originals["test"]["fine_labels"]
