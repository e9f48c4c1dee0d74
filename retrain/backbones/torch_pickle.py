"""Read PyTorch weight files into numpy arrays, without torch and without running code.

A `.pth` state dict is a pickle, and a pickle can call any Python function it names. So the
unpickler here admits only the handful of globals a state dict needs (`OrderedDict`, the tensor
rebuild function, the typed storage classes), each mapped to a small local implementation that
builds numpy arrays from the raw storage bytes; any other global is refused with a `RetrainError`.

Two layouts are understood:
- legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): five things back to back in one
  stream: magic number pickle, protocol pickle, sys-info pickle, the main pickle (tensors refer to
  storages by persistent id), a pickle of the storage keys, then per storage an int64 element
  count followed by its raw little-endian bytes;
- zip (torch >= 1.6): `archive/data.pkl` plus one raw file per storage under `archive/data/`.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from retrain.errors import RetrainError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for `torch.FloatStorage` & co.: only carries the numpy dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One raw storage; its bytes arrive after the main pickle (legacy) or from the zip."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.array = None  # 1-D numpy array once read


class _LazyTensor:
    """A tensor whose storage may not be read yet; `materialize()` makes the numpy array."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), stride

    def materialize(self):
        flat = self.storage.array
        itemsize = flat.dtype.itemsize
        if not self.size:
            return flat[self.offset].copy()
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in `_ALLOWED_GLOBALS`, to local stand-ins."""

    def __init__(self, file, path, storages, zip_reader=None):
        super().__init__(file)
        self._path = path
        self._storages = storages  # key -> _Storage, filled as persistent ids appear
        self._zip_reader = zip_reader

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RetrainError(
                f"{self._path}: refuses pickle global '{module}.{name}' "
                "(weights files may only hold tensors; this one would run code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise RetrainError(f"{self._path}: unexpected persistent id {pid!r} in weights file")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise RetrainError(f"{self._path}: unsupported storage type {storage_type!r}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(storage_type.dtype, numel)
            if self._zip_reader is not None:
                storage.array = self._zip_reader(key, storage_type.dtype)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy view of a storage: (view_key, offset, size)
            _, view_offset, _ = view
            return _StorageView(storage, view_offset)
        return storage


class _StorageView(_Storage):
    """A legacy storage view: an offset into another storage, resolved after reading."""

    def __init__(self, base, offset):
        self.base, self.offset = base, offset

    @property
    def array(self):
        return self.base.array[self.offset:]


def _materialize(obj):
    """Replace every `_LazyTensor` in nested dicts/lists/tuples with its numpy array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        out = obj.__class__((k, _materialize(v)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _read_exact(f, n, path):
    data = f.read(n)
    if len(data) != n:
        raise RetrainError(f"{path}: weights file is truncated (reinstall the package or "
                           "download the file again)")
    return data


def _load_legacy(f, path):
    plain = _RestrictedUnpickler(f, path, {})
    if plain.load() != _LEGACY_MAGIC:
        raise RetrainError(f"{path}: not a PyTorch weights file (bad magic number)")
    plain.load()  # protocol version
    sys_info = plain.load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise RetrainError(f"{path}: big-endian PyTorch weights are not supported")
    storages = {}
    result = _RestrictedUnpickler(f, path, storages).load()
    keys = _RestrictedUnpickler(f, path, {}).load()
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", _read_exact(f, 8, path))
        nbytes = numel * storage.dtype.itemsize
        storage.array = np.frombuffer(_read_exact(f, nbytes, path), dtype=storage.dtype)
    return result


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise RetrainError(f"{path}: zip file holds no data.pkl; not a PyTorch weights file")
        prefix = pkl[: -len("data.pkl")]

        def read_storage(key, dtype):
            return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype)

        with archive.open(pkl) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), path, {}, read_storage).load()


def load_state_dict(path):
    """Read a PyTorch `.pth` state dict into `{name: numpy array}` without importing torch.

    Raises RetrainError (naming the file) on a missing, truncated or corrupt file and on any
    pickle global that is not part of a plain tensor state dict.
    """
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        else:
            with open(path, "rb") as f:
                result = _load_legacy(f, path)
        return _materialize(result)
    except RetrainError:
        raise
    except FileNotFoundError:
        raise RetrainError(f"{path}: weights file not found") from None
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError,
            TypeError, IndexError, AttributeError, struct.error) as e:
        kind = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise RetrainError(f"{path}: weights file is {kind} ({type(e).__name__}: {e}); "
                           "reinstall the package or download the file again") from None
