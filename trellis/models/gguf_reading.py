"""One parse of a GGUF file per model load.

Loading a GGUF, transformers parses the file's metadata for the config and again for the weights,
and ``keep_quantized=True`` reads its blocks a third time; each parse walks every metadata field
(a tokenizer's vocabulary and merges: SmolLM2's take ~5 s on 2 cores). transformers also rebuilds
gguf's tensor-name map for each of the model's modules (~400 maps of ~18 ms). Within
``gguf_parsed_once()`` a file is parsed once and a map made once per architecture and layer count:
a load of the embedded model kept quantized takes 21-28 s without it on a 2-core Zen 3, 8-11 s with it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

_lock = threading.RLock()  # one load patches gguf at a time; a load within a load shares its parses


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While it is entered, ``gguf.GGUFReader(path)`` returns the reader made for the same
    unchanged file, and ``gguf.get_tensor_name_map`` the map made for the same arguments, as
    transformers imports both when it reads a GGUF. Does nothing without the gguf package."""
    try:
        import gguf
    except ImportError:
        yield
        return
    with _lock:
        if getattr(gguf.GGUFReader, "_trellis_parsed_once", False):  # entered already by this thread
            yield
            return
        reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple, object] = {}

        def reader(path: str | os.PathLike, mode: str = "r") -> object:
            status = os.stat(path)
            key = (os.path.realpath(path), mode, status.st_size, status.st_mtime_ns)
            if key not in readers:
                readers[key] = reader_class(path, mode)
            return readers[key]

        reader._trellis_parsed_once = True
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
