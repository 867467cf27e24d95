"""NeRF backends. Importing this package registers the built-in ones (see ``base.get_backend``)."""

from tasks.nerf import ngp  # noqa: F401  (registers "ngp")
# "instant_ngp" and "nerfacto": importing them needs neither pyngp nor nerfstudio.
from tasks.nerf import instant_ngp, nerfacto  # noqa: F401
# "splat": gsplat is needed to train (densification), not to import.
from tasks.nerf import splat  # noqa: F401
