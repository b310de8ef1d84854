"""Tensors handed to the model service through shared memory instead of the HTTP body.

A `depends` call pickles its arguments into the HTTP body: about 3.6 ms per MB here, so a
64-slice CT batch (37 MB float32) costs more to ship (~135 ms) than the model costs to run
(~62 ms). On one host the caller writes the batch into a file under /dev/shm and sends its
name; the model service maps it read-only and runs the model on that memory without a copy
(the system-shared-memory protocol of Triton, for the same reason). The caller owns the file
and removes it when the call returns, so nothing outlives the request.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import BaseModel

SHM_DIR = Path("/dev/shm")  # noqa: S108 (O_EXCL, mode 0600, unguessable names)
_NAME = re.compile(r"^befund-[0-9a-f]{32}$")
_DTYPES = {"float32", "float16", "uint8", "int16"}


class SharedTensor(BaseModel):
    """What travels in the request: where the tensor lies, how to read it, which model runs it.

    `model` is a card key (`name@version`); empty means the model whose input shape fits.
    """

    name: str
    shape: list[int]
    dtype: str
    model: str = ""


def available() -> bool:
    """Shared memory needs a tmpfs at /dev/shm (Linux); elsewhere callers pickle tensors."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


@contextmanager
def shared_tensor(shape: tuple[int, ...], dtype: str = "float32",
                  model: str = "") -> Iterator[tuple[np.ndarray, SharedTensor]]:
    """A writable array in shared memory and its handle; the memory is freed on exit."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not shareable")
    name = f"befund-{uuid.uuid4().hex}"
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        buf = mmap.mmap(fd, max(nbytes, 1))
        array = np.ndarray(shape, dtype=dtype, buffer=buf)
        try:
            yield array, SharedTensor(name=name, shape=list(shape), dtype=dtype, model=model)
        finally:
            del array
            _close(buf)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


@contextmanager
def open_shared(ref: SharedTensor) -> Iterator[np.ndarray]:
    """The read-only array a caller shared; the name is checked before it becomes a path."""
    if not _NAME.match(ref.name):
        raise ValueError(f"not a befund shared tensor: {ref.name!r}")
    if ref.dtype not in _DTYPES or any(d < 0 for d in ref.shape):
        raise ValueError(f"bad shared tensor description: {ref.dtype} {ref.shape}")
    nbytes = int(np.prod(ref.shape)) * np.dtype(ref.dtype).itemsize
    fd = os.open(SHM_DIR / ref.name, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size != max(nbytes, 1):
            raise ValueError(f"shared tensor {ref.name} holds {size} bytes, its shape needs {nbytes}")
        buf = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        array = np.ndarray(tuple(ref.shape), dtype=ref.dtype, buffer=buf)
        try:
            yield array
        finally:
            del array
            _close(buf)
    finally:
        os.close(fd)


def _close(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:
        pass  # a view outlives the block: the mapping is released with that view
