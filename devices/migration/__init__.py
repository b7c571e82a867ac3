"""Device migration: the per-device VFIO v2 engine and the stream it produces and consumes.

``engine`` drives a device's arcs; ``stream`` is the versioned, checksummed envelope;
``primitives`` its byte-level codecs (with the C ``fastpath``); ``memory_journal`` lets a
stream be applied in place and taken back.
"""
