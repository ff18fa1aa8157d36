"""The BentoML service, in pieces: the front users talk to, the engine service, uploads, auth, metrics, statuses.

`mmserve.service` is the entry point BentoML imports (`bentoml serve mmserve.service:MmServe`). This package's
own import runs nothing: `mmserve.serving.statuses` can be imported without reading the service configuration.
"""
