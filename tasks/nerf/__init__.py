"""NeRF backends. Importing this package registers the built-in ones (see ``base.get_backend``)."""

from tasks.nerf import ngp  # noqa: F401  (registers "ngp")
# "instant_ngp" and "nerfacto": importing them needs neither pyngp nor nerfstudio.
from tasks.nerf import instant_ngp, nerfacto  # noqa: F401
