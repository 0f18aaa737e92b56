"""compression: pure codecs that turn pseudo-gradients into bytes and back.

Layers above import from here: codecs by name (`get_codec`), `Encoded` and its sharding
helpers, `ErrorFeedback`, and the validated msgpack wire format. Only torch, numpy, msgpack
and (lazily, for `bnb8`) bitsandbytes are used.
"""

from compression.codec import Codec, Encoded, codec_names, concat, get_codec, shard_bounds
from compression.feedback import ErrorFeedback
from compression.wire import (
    WireError,
    WireLimits,
    pack,
    pack_message,
    unpack,
    unpack_message,
)

__all__ = [
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "WireError",
    "WireLimits",
    "codec_names",
    "concat",
    "get_codec",
    "pack",
    "pack_message",
    "shard_bounds",
    "unpack",
    "unpack_message",
]
