"""bna-gateway: backdoor detection and BNA mitigation for image classifiers, and the gateway that serves them.

Everything installs under this one import name, so a user's own ``models``, ``service`` or ``utils``
package never collides with ours. The sub-packages live in the repository's top-level folders
(``pyproject.toml`` maps them with setuptools' ``package-dir``):

- ``bna_gateway.models`` (``models/``): shared by both sides, imports neither. Architectures, the bundle
  format, twin execution and the flag rule, image decoding, device resolution.
- ``bna_gateway.mitigation`` (``mitigation/``): the offline job (``bna train|detect|mitigate|evaluate|demo``).
- ``bna_gateway.service`` (``service/``): the FastAPI gateway (``bna serve``).

See docs/architecture.md for the map.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bna-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"
