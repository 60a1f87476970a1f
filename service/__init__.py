"""The gateway: serves a bundle's classifier f and its BNA twins over HTTP.

Request pipeline (LitServe's stage names): *decode* (``payload`` + ``decode``: body -> images ->
``uint8`` tensors) -> *batch* (``batching``: concurrent requests share model calls) -> *predict*
(``predict``: f, then one twin pass per detected target for the suspects) -> *unbatch* (``batching``)
-> *encode* (``api.routes.classify`` + ``schemas``). ``main.create_app`` assembles the app,
``server.run_server`` runs it (``bna serve``), ``config.Settings`` holds every knob (``BNA_*``).
"""
