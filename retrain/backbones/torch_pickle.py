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

The file is hostile until proven otherwise, so the parser is also memory-safe: every tensor's
offset, sizes and strides are checked against its storage before numpy sees them, storages must
hold the bytes they declare, nesting and counts are capped, and BUILD (setting an object's state)
is allowed only on the state dict itself, never on the stand-ins. Each failure is one line.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

from retrain.errors import RetrainError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# A Lite2 weights file is 40 MB; these are far beyond any state dict and far below harm.
MAX_WEIGHTS_BYTES = 2 * 1024**3  # the whole file, and all storages together
MAX_TENSOR_BYTES = 1024**3  # one tensor as an array
MAX_DEPTH = 32  # containers inside containers (a state dict nests 1-3 deep)
MAX_ITEMS = 1_000_000  # tensors, keys and values all together (Lite0 has ~350)
MAX_DIMS = 16

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


class _Frozen:
    """A stand-in whose state a pickle may not set (BUILD is refused before it gets here)."""

    def __setstate__(self, state):
        raise RetrainError("refuses to set the state of a tensor or storage stand-in")


class _StorageType(_Frozen):
    """Stands in for `torch.FloatStorage` & co.: only carries the numpy dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage(_Frozen):
    """One raw storage; its bytes arrive after the main pickle (legacy) or from the zip."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.array = None  # 1-D numpy array once read


class _LazyTensor(_Frozen):
    """A tensor whose storage may not be read yet; `materialize()` makes the numpy array."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
        self.storage, self.offset = storage, _count(offset, "storage offset")
        self.size = _dims(size, "size")
        self.stride = _dims(stride, "stride")
        if len(self.stride) != len(self.size):
            raise ValueError(f"a tensor has {len(self.size)} sizes but {len(self.stride)} strides")

    def materialize(self):
        flat = self.storage.array
        if flat is None:
            raise ValueError("a tensor refers to a storage the file never provides")
        itemsize = flat.dtype.itemsize
        numel = 1
        for n in self.size:
            numel *= n
        # The last element a view reads: it must lie inside the storage (Python ints: no overflow).
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if numel else self.offset - 1
        if last >= len(flat) or numel * itemsize > MAX_TENSOR_BYTES:
            raise ValueError(
                f"a tensor of {numel} elements (offset {self.offset}, strides {self.stride}) "
                f"reaches past its storage of {len(flat)}"
            )
        if not self.size:
            return flat[self.offset].copy()
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize if n > 1 else 0 for n, s in zip(self.size, self.stride)),  # unused: any
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _count(value, what):
    """A non-negative Python int (not a bool), else ValueError."""
    if type(value) is not int or value < 0:
        raise ValueError(f"a tensor's {what} is {value!r}, not a count")
    return value


def _dims(values, what):
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise ValueError(f"a tensor's {what} is not a short tuple")
    return tuple(_count(v, what) for v in values)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
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


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals in `_ALLOWED_GLOBALS`, to local stand-ins.

    The pure-Python unpickler, so that BUILD can be restricted: it may set the attributes of an
    OrderedDict (a state dict's `_metadata`) and of nothing else, so a file cannot rewrite the
    storage classes or the rebuild functions that every later load shares.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) is not collections.OrderedDict or not isinstance(self.stack[-1], dict):
            raise RetrainError(
                f"{self._path}: refuses to set the state of a {type(target).__name__} "
                "(weights files may only hold tensors)"
            )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

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
                "(weights files may only hold tensors; this one would run code)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise RetrainError(f"{self._path}: unexpected persistent id {str(pid)[:80]} in weights file")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise RetrainError(f"{self._path}: unsupported storage type {str(storage_type)[:80]}")
        if not isinstance(key, (str, int)) or type(numel) is not int or numel < 0:
            raise RetrainError(
                f"{self._path}: a storage has key {str(key)[:40]!r} and {str(numel)[:40]} elements; the file is corrupt"
            )
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            if len(self._storages) >= MAX_ITEMS:
                raise RetrainError(f"{self._path}: more than {MAX_ITEMS} storages; not a state dict")
            storage = self._storages[key] = _Storage(storage_type.dtype, numel)
            if self._zip_reader is not None:
                storage.array = self._zip_reader(key, storage_type.dtype)
                if len(storage.array) < numel:
                    raise RetrainError(
                        f"{self._path}: storage {key} holds {len(storage.array)} of its {numel} elements; "
                        "the file is corrupt"
                    )
        elif storage.dtype != storage_type.dtype:
            raise RetrainError(f"{self._path}: storage {key} is declared with two types; the file is corrupt")
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy view of a storage: (view_key, offset, size)
            if not (isinstance(view, tuple) and len(view) == 3):
                raise RetrainError(f"{self._path}: a storage view is {str(view)[:80]}; the file is corrupt")
            return _StorageView(storage, _count(view[1], "storage view offset"))
        return storage


class _StorageView(_Storage):
    """A legacy storage view: an offset into another storage, resolved after reading."""

    def __init__(self, base, offset):
        self.base, self.offset = base, offset

    @property
    def array(self):
        if self.base.array is None:
            return None
        return self.base.array[self.offset :]

    @property
    def dtype(self):
        return self.base.dtype


def _materialize(obj, path, depth=0, seen=None):
    """Replace every `_LazyTensor` in nested dicts/lists/tuples with its numpy array.

    At most MAX_DEPTH levels and MAX_ITEMS objects in all: a pickle can nest or repeat a
    container (by reference) far beyond what any state dict does.
    """
    seen = [0] if seen is None else seen
    seen[0] += 1
    if depth > MAX_DEPTH or seen[0] > MAX_ITEMS:
        raise RetrainError(
            f"{path}: nested more than {MAX_DEPTH} deep or more than {MAX_ITEMS} objects; not a state dict"
        )
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return obj.__class__((k, _materialize(v, path, depth + 1, seen)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path, depth + 1, seen) for v in obj)
    return obj


def _read_exact(f, n, path):
    data = f.read(n)
    if len(data) != n:
        raise RetrainError(f"{path}: weights file is truncated (reinstall the package or download the file again)")
    return data


def _load_legacy(f, path):
    f = io.BytesIO(_read_exact(f, min(os.fstat(f.fileno()).st_size, MAX_WEIGHTS_BYTES + 1), path))
    if len(f.getbuffer()) > MAX_WEIGHTS_BYTES:
        raise RetrainError(f"{path}: over {MAX_WEIGHTS_BYTES} bytes; not a backbone's weights file")
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
    if not isinstance(keys, (list, tuple)):
        raise RetrainError(f"{path}: the storage keys are a {type(keys).__name__}; the file is corrupt")
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", _read_exact(f, 8, path))
        if numel != storage.numel:  # torch writes the count it declared; anything else is damage
            raise RetrainError(
                f"{path}: storage {str(key)[:40]} declares {storage.numel} elements but holds {numel}; "
                "the file is corrupt"
            )
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

        if sum(info.file_size for info in archive.infolist()) > MAX_WEIGHTS_BYTES:
            raise RetrainError(f"{path}: unpacks to over {MAX_WEIGHTS_BYTES} bytes; not a backbone's weights file")

        def read_storage(key, dtype):
            return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype)

        with archive.open(pkl) as f:
            return _materialize(_RestrictedUnpickler(io.BytesIO(f.read()), path, {}, read_storage).load(), path)


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
                result = _materialize(_load_legacy(f, path), path)
        return result
    except RetrainError:
        raise
    except FileNotFoundError:
        raise RetrainError(f"{path}: weights file not found") from None
    except (
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        struct.error,
        OverflowError,
        MemoryError,
        RecursionError,
        zlib.error,
    ) as e:
        kind = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise RetrainError(
            f"{path}: weights file is {kind} ({type(e).__name__}: {str(e)[:200]}); "
            "reinstall the package or download the file again"
        ) from None
