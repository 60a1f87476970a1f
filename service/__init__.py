"""The gateway: serves a bundle's classifier f and its BNA twins over HTTP.

Request pipeline (LitServe's stage names): *decode* (``payload`` splits the body, ``decoding`` places the
decode by pixel count: body -> images -> ``uint8`` tensors) -> *batch* (``batching``: concurrent requests
share model calls, behind ``admission``'s queue bound and deadline) -> *predict* (``predict``: f, then one
twin pass per detected target for the suspects) -> *unbatch* (``batching``) -> *encode*
(``api.routes.classify``). ``bundles`` holds the bundle being served and ``rollout`` swaps in a new one
without downtime; ``connections`` guards the HTTP connections (head timeout, connection cap, lingering
close). ``main.create_app`` assembles the app, ``server.run_server`` runs it (``bna serve``),
``config.Settings`` holds every knob (``BNA_*``, documented in docs/http.md).
"""
